"""The source tree's structure: import cycles are tested (a new one fails), and every example in the CLI's help
names a file that exists and parses as that command's config."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

# Cycles that exist today, each to be removed by issue 20's restructuring; the test fails on any other cycle, and
# on a listed one that is gone (so this list only shrinks).
KNOWN_CYCLES = {
    frozenset({"posttrain.config", "posttrain.plan"}),
    frozenset({"posttrain.models.attention", "posttrain.models.loading", "posttrain.models.native"}),
    frozenset({"posttrain.data.audit", "posttrain.data.clean", "posttrain.data.consistency", "posttrain.data.synth"}),
}


def import_graph() -> dict[str, set[str]]:
    """posttrain module -> the posttrain modules it imports, at the top or inside functions (a lazy import is an
    edge too: it is a dependency all the same)."""
    files = {}
    for path in (SRC / "posttrain").rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        files[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    graph = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
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


def test_no_new_import_cycles():
    found = cycles(import_graph())
    assert not found - KNOWN_CYCLES, f"new import cycles: {[sorted(c) for c in found - KNOWN_CYCLES]}"
    assert not KNOWN_CYCLES - found, f"cycles gone (remove them from KNOWN_CYCLES): {[sorted(c) for c in KNOWN_CYCLES - found]}"


def test_the_planner_and_the_engine_share_the_runtime_not_each_other():
    graph = import_graph()
    assert "posttrain.engine.trainer" not in graph["posttrain.plan"]
    assert {"posttrain.runtime"} <= graph["posttrain.plan"] & graph["posttrain.engine.trainer"]


def test_every_example_file_in_the_help_exists_and_parses():
    from posttrain.cli import EXAMPLES
    from posttrain.config import load_config

    repo = SRC.parent
    seen = 0
    for command, text in EXAMPLES.items():
        for path in re.findall(r"\bexamples/[\w./-]+\.ya?ml\b", text):
            assert (repo / path).is_file(), f"`posttrain {command} --help` names {path}, which does not exist"
            if command in ("sft", "rm", "dpo", "kto", "grpo", "ppo"):
                load_config(command, str(repo / path), ["data.train=x.jsonl"])
            seen += 1
    assert seen >= 6
