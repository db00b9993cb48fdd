"""Every module imports (no NameError lurking); the generated docs (docs/config.md's key reference, the README's
layout map) match the code; every package and module says what it is for; the docs' links resolve; and
.ci/suite_line.py reads pytest's summary line."""

import importlib
import importlib.util
import pkgutil
import re
from pathlib import Path

import posttrain
from posttrain import docs

ROOT = Path(__file__).resolve().parent.parent
REGENERATE = "run `python -m posttrain.docs` to regenerate"


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(posttrain.__path__, prefix="posttrain.")]
    assert "posttrain.stages.sft" in names and "posttrain.engine.trainer" in names
    for name in names:
        if name in ("posttrain.__main__", "posttrain.docs"):
            continue  # these run the CLI on import
        importlib.import_module(name)


def test_config_reference_is_generated_from_the_config():
    section = docs.between(ROOT / "docs" / "config.md", docs.KEYS)
    assert section == docs.config_reference(), f"{REGENERATE} docs/config.md's reference"


def test_readme_layout_is_generated_from_the_docstrings():
    section = docs.between(ROOT / "README.md", docs.LAYOUT)
    assert section == docs.layout_markdown(), f"{REGENERATE} the README's layout map"
    for entry in ("- `losses.py`: ", "- `commands/`: ", "  - `batching.py`: ", "- `data/`: "):
        assert entry in section


def test_every_package_and_module_has_a_docstring():
    missing = [str(p.relative_to(ROOT)) for p in docs.source_files() if not docs.docstring(p)]
    assert not missing, "no docstring (the layout map shows its first sentence): " + ", ".join(missing)


def test_layout_purpose_is_the_first_sentence():
    assert docs.purpose("Loss functions: pure math. Second sentence.\n\nMore.") == "Loss functions: pure math."
    assert docs.purpose("One ``x`` per\nline, see :mod:`posttrain.loop.run` (e.g. this).") == (
        "One `x` per line, see `posttrain.loop.run` (e.g. this).")
    assert docs.purpose("") == ""


# ------------------------------------------------------------------------------------------------ links

def _outside_fences(text: str) -> list[str]:
    lines, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence:
            lines.append(line)
    return lines


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    for line in _outside_fences(path.read_text()):
        if m := re.match(r"#{1,6} (.+)", line):
            slug = _slug(m[1])
            seen[slug] = seen.get(slug, -1) + 1
            if seen[slug]:
                seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def test_docs_links_point_to_files_and_headings_that_exist():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    bad = []
    for page in pages:
        for line in _outside_fences(page.read_text()):
            line = re.sub(r"`[^`]*`", "", line)  # code spans hold no links
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+:", target):
                    continue  # http(s), mailto: not checked here
                file, _, anchor = target.partition("#")
                dest = (page.parent / file).resolve() if file else page
                if not dest.exists():
                    bad.append(f"{page.relative_to(ROOT)}: {target}: no such file")
                elif anchor and (dest.suffix != ".md" or anchor not in _anchors(dest)):
                    bad.append(f"{page.relative_to(ROOT)}: {target}: no such heading")
    assert not bad, "\n".join(bad)
    assert _slug("The feedback loop: `posttrain loop` and `posttrain rollback`") == (
        "the-feedback-loop-posttrain-loop-and-posttrain-rollback")


# ------------------------------------------------------------------------------------------ suite line

def _suite_line_module():
    spec = importlib.util.spec_from_file_location("suite_line", ROOT / ".ci" / "suite_line.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_suite_line_reads_pytest_summaries(tmp_path):
    sl = _suite_line_module()
    full = "....\n==== 1043 passed, 13 skipped, 3 warnings in 732.51s (0:12:12) ====\n"
    quiet = "1043 passed, 13 skipped in 732.51s (0:12:12)\n"
    for log in (full, quiet):
        assert sl.suite_line(log, "2026-12-02") == "1043 passed, 13 skipped, 12m12s of pytest, 2026-12-02"
    # no h:mm:ss under a minute; failures and errors are kept; colours and an earlier summary are ignored
    assert sl.suite_line("= 9 passed in 1.0s =\n\x1b[31m= 1 failed, 5 passed, 2 errors in 59.9s =\x1b[0m",
                         "2026-01-01") == "1 failed, 5 passed, 2 errors, 59s of pytest, 2026-01-01"
    assert sl.parse_summary("2 passed in 3725.0s (1:02:05)")[2] == "1h02m05s"
    for log in ("", "collected 12 items\n", "3 warnings in 1.0s"):
        try:
            sl.parse_summary(log)
        except ValueError:
            continue
        raise AssertionError(f"parsed {log!r}")

    readme = tmp_path / "README.md"
    readme.write_text(f"a\nMeasured: {sl.START}old{sl.END} (more)\n")
    (tmp_path / "pytest.log").write_text(quiet)
    assert sl.main([str(tmp_path / "pytest.log"), "--date", "2026-12-03", "--readme", str(readme)]) == 0
    assert readme.read_text() == f"a\nMeasured: {sl.START}1043 passed, 13 skipped, 12m12s of pytest, 2026-12-03{sl.END} (more)\n"
    assert sl.main([str(tmp_path / "missing.log"), "--readme", str(readme)]) == 2


def test_readme_suite_line_is_in_the_scripts_format():
    sl = _suite_line_module()
    text = (ROOT / "README.md").read_text()
    assert text.count(sl.START) == 1 and text.count(sl.END) == 1
    line = text[text.index(sl.START) + len(sl.START): text.index(sl.END)]
    assert re.fullmatch(r"\d+ \w+(, \d+ \w+)*, (\d+h)?(\d+m)?\d+s of pytest, \d{4}-\d\d-\d\d", line), line


def test_example_configs_are_valid():
    from posttrain.commands import config_commands, load_config

    for path in sorted((ROOT / "examples").glob("*.yaml")):
        # sft_lora.yaml -> sft, dpo.yaml -> dpo, demo_rm.yaml -> rm, demo_json.yaml -> sft
        stage = next((part for part in path.stem.split("_") if part in config_commands()), "sft")
        cfg = load_config(stage, path, [] if "data:" in path.read_text() else ["data.train=x.jsonl"])
        assert cfg.method in ("full", "lora", "qlora", "prompt", "prefix")
    # The reward-hacking example: a GRPO config whose rewards and guard rules parse.
    from posttrain.rewards.registry import _check_item
    from posttrain.rl.guards import parse_rules

    cfg = load_config("grpo", ROOT / "examples" / "reward_hacking" / "config.yaml")
    assert (ROOT / cfg.data.train).is_file() and (ROOT / cfg.data.eval).is_file()
    for i, item in enumerate(cfg.rewards + cfg.guards.rewards):
        _check_item(item, f"rewards[{i}]")
    assert {r.metric for r in parse_rules(cfg.guards.rules)} >= {"guard/informative", "length/change"}
