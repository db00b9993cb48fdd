"""The source tree's structure: no import cycles, no lower layer importing a higher one, every command registered
the same way, and every example in the CLI's help naming a file that exists and parses as that command's config."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph() -> dict[str, set[str]]:
    """posttrain module -> the posttrain modules it imports, at the top or inside functions (a lazy import is an
    edge too: it is a dependency all the same). Imports under ``if TYPE_CHECKING:`` are not edges: they name a
    type for annotations and never run (a stage is typed against its command's config, which the command builds)."""
    files = {}
    for path in (SRC / "posttrain").rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        files[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    graph = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                       for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("posttrain"):
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], set(), 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.add(frozenset(component))
    return found


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}
    assert cycles({"a": {"b"}, "b": set()}) == set()


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, f"import cycles: {[sorted(c) for c in found]}"


# Layers, lowest first: a module may import its own layer and those below it, never one above. (Packages not
# listed, such as demo and docs, sit on top.)
# The loop's registry is a store that the server reads, so it sits with the feedback store, below serve; the loop
# itself drives stages through their commands' configs, so it sits with the commands.
LAYERS = [
    {"errors", "runtime", "methods", "config", "losses"},
    {"data", "models", "plan", "rewards", "openai_compat", "generation", "vllm_backend"},
    {"engine"},
    {"rl"},
    {"curate", "feedback", "loop.registry", "evals"},
    {"stages", "serve"},
    {"commands", "loop", "pipeline", "ui"},
    {"cli", "__main__"},
]


def _layer(module: str) -> int | None:
    parts = module.split(".")[1:]
    for depth in (2, 1):
        name = ".".join(parts[:depth])
        if len(parts) >= depth and (found := next((i for i, names in enumerate(LAYERS) if name in names), None)) is not None:
            return found
    return None


def test_no_lower_layer_imports_a_higher_one():
    graph = import_graph()
    upward = []
    for module, targets in graph.items():
        low = _layer(module)
        for target in targets:
            high = _layer(target)
            if low is not None and high is not None and high > low:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports from a lower layer into a higher one:\n" + "\n".join(sorted(upward))


def test_the_planner_and_the_engine_share_the_runtime_not_each_other():
    graph = import_graph()
    planner = {m for m in graph if m.startswith("posttrain.plan")}
    assert not any(t.startswith("posttrain.engine") for m in planner for t in graph[m])
    assert "posttrain.runtime" in graph["posttrain.plan.memory"] and "posttrain.runtime" in graph["posttrain.engine.trainer"]


def test_every_command_is_registered_the_same_way():
    from posttrain.commands import COMMANDS, command

    files = {p.stem for p in (SRC / "posttrain" / "commands").glob("*.py")} - {"__init__", "base"}
    assert files == set(COMMANDS), "a module in commands/ is not in COMMANDS, or a command has no module"
    for name in COMMANDS:
        mod = command(name)
        assert isinstance(mod.HELP, str) and mod.HELP, name
        if hasattr(mod, "main"):
            assert not hasattr(mod, "Config"), f"{name}: a command has either main(argv) or Config + run, not both"
        else:
            assert callable(mod.run) and isinstance(mod.EXAMPLES, str), name


def test_command_modules_import_nothing_heavy():
    """``posttrain --help`` imports every command module: none may pull torch or transformers in."""
    import subprocess
    import sys

    code = ("import sys; from posttrain.commands import COMMANDS, command; [command(n) for n in COMMANDS]; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"command modules import {out} at the top"


def test_every_example_file_in_the_help_exists_and_parses():
    from posttrain.commands import config_commands, load_config

    repo = SRC.parent
    seen = 0
    for command, mod in config_commands().items():
        for path in re.findall(r"\bexamples/[\w./-]+\.ya?ml\b", mod.EXAMPLES):
            assert (repo / path).is_file(), f"`posttrain {command} --help` names {path}, which does not exist"
            load_config(command, str(repo / path), ["data.train=x.jsonl"])
            seen += 1
    assert seen >= 6


def test_tests_mirror_the_source_tree():
    """A folder of tests per source package (tests/data for posttrain.data, ...); only tests of top-level modules,
    the layout and the docs sit at the top of tests/."""
    tests = SRC.parent / "tests"
    packages = {p.name for p in (SRC / "posttrain").iterdir() if (p / "__init__.py").is_file()}
    folders = {p.name for p in tests.iterdir() if (p / "__init__.py").is_file()}
    assert folders - {"benchmarks"} <= packages, f"test folders without a package: {sorted(folders - packages)}"
    assert {"data", "curate", "engine", "models", "stages", "serve"} <= folders
