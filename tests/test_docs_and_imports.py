"""Every module imports (no NameError lurking), and the README's key reference matches the code."""

import importlib
import pkgutil
from pathlib import Path

import posttrain
from posttrain.config import markdown_reference

ROOT = Path(__file__).resolve().parent.parent


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(posttrain.__path__, prefix="posttrain.")]
    assert "posttrain.stages.sft" in names and "posttrain.engine.trainer" in names
    for name in names:
        if name in ("posttrain.__main__", "posttrain.demo.__main__", "posttrain.docs"):
            continue  # these run the CLI on import
        importlib.import_module(name)


def test_readme_reference_is_generated_from_the_config():
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- keys:start -->\n", "<!-- keys:end -->"
    section = readme[readme.index(start) + len(start) : readme.index(end)]
    assert section == markdown_reference(), "run `python -m posttrain.docs` to regenerate the README reference"


def test_example_configs_are_valid():
    from posttrain.config import STAGE_CONFIGS, load_config

    for path in sorted((ROOT / "examples").glob("*.yaml")):
        # sft_lora.yaml -> sft, dpo.yaml -> dpo, demo_rm.yaml -> rm, demo_json.yaml -> sft
        stage = next((part for part in path.stem.split("_") if part in STAGE_CONFIGS), "sft")
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
