"""posttrain pipeline: recipes resolve and validate before any compute, unchanged stages are skipped, a changed stage
reruns with the stages after it only, and a gate stops a stage that made the model worse at its task."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.errors import ConfigError
from posttrain.pipeline.recipe import load_plan

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _recipe(tmp_path: Path, body: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _prefs(tmp_path: Path, inverted: bool = False) -> str:
    rows = [json.loads(line) for line in (EXAMPLES / "data" / "tiny_prefs.jsonl").read_text().splitlines()]
    if inverted:
        rows = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]
    return _jsonl(tmp_path / ("inverted.jsonl" if inverted else "prefs.jsonl"), rows)


def _chosen_as_sft(tmp_path: Path) -> str:
    """The preference pairs' chosen answers as SFT rows: the eval-loss task a good DPO stage improves."""
    rows = [json.loads(line) for line in (EXAMPLES / "data" / "tiny_prefs.jsonl").read_text().splitlines()]
    return _jsonl(tmp_path / "chosen.jsonl", [{"messages": r["prompt"] + r["chosen"]} for r in rows])


def _tiny_recipe(tmp_path: Path, model_dir: Path, prefs: str, **gates) -> dict:
    tiny = str(EXAMPLES / "data" / "tiny_chat.jsonl")
    return {
        "model": str(model_dir), "method": "lora", "output_dir": str(tmp_path / "run"),
        "defaults": {"max_steps": 2, "batch_size": 4, "max_length": 64, "tensorboard": False, "lora": {"r": 4, "alpha": 8}},
        "stages": [
            {"name": "sft", "data": {"train": tiny}, "improves": [], "lr": 1e-3},
            {"name": "dpo", "data": {"train": prefs}, "improves": ["chosen"], "lr": 5e-3, "max_steps": 6, "beta": 0.5, "rpo_alpha": 1.0},
            {"name": "polish", "stage": "sft", "data": {"train": tiny}, "improves": []},
        ],
        "evals": {"tasks": [{"name": "chosen", "data": _chosen_as_sft(tmp_path)}],
                  "general_questions": "builtin", "general_text": "builtin", "sycophancy": None,
                  "limit": 4, "max_new_tokens": 4},
        "gates": {"max_kl": 100.0, "max_perplexity_increase": 10.0, "max_general_drop": 1.0, **gates},
    }


# ------------------------------------------------------------------------------------------------ validation
def test_every_stage_config_is_validated_before_anything_runs(tmp_path):
    base = {"stages": [{"stage": "sft", "data": {"train": "a.jsonl"}}, {"stage": "dpo", "data": {"train": "p.jsonl"}}]}
    plan = load_plan(_recipe(tmp_path, base))
    assert [s.name for s in plan.stages] == ["sft", "dpo"]
    assert plan.stages[1].values["adapter"] == str(Path("runs/pipeline/sft")) and plan.stages[1].parent == "sft"
    assert plan.stages[0].values["data"]["train"] == str(tmp_path / "a.jsonl")  # relative to the recipe

    cases = [
        ({"stages": [{"stage": "sft", "data": {"train": "a"}}, {"stage": "dpo", "data": {"train": "p"}, "betta": 1}]},
         "stage 'dpo' (dpo): betta: unknown key (did you mean beta?)"),
        ({"stages": [{"stage": "sft"}]}, "stage 'sft' (sft): data.train: required"),
        ({"stages": [{"stage": "sfx"}]}, "stages[0].stage: expected one of"),
        ({"stages": [{"stage": "sft", "data": {"train": "a"}, "output_dir": "x"}]}, "output_dir: set by the pipeline"),
        ({"stages": [{"stage": "grpo", "data": {"train": "a"}, "rewards": [{"reward_model": "{stage:rm}"}]}]},
         "{stage:rm} names no earlier stage"),
        ({"stages": [{"stage": "sft", "data": {"train": "a"}, "method": "lora"},
                     {"stage": "dpo", "data": {"train": "p"}, "method": "full"}]}, "full fine-tuning cannot start"),
        ({"stages": [{"stage": "sft", "data": {"train": "a"}}],
          "evals": {"tasks": [{"name": "a", "data": "x"}, {"name": "b", "data": "y"}]}}, "say which evals.tasks"),
        ({"stages": [{"stage": "sft", "data": {"train": "a"}, "improves": ["nope"]}],
          "evals": {"tasks": [{"name": "a", "data": "x"}]}}, "improves: expected a list of evals.tasks names"),
        ({"stages": []}, "stages: required"),
    ]
    for body, message in cases:
        with pytest.raises(ConfigError, match=None) as err:
            load_plan(_recipe(tmp_path, body))
        assert message in str(err.value), (message, str(err.value))


def test_overrides_address_a_stage_by_name_or_the_recipe(tmp_path):
    body = {"stages": [{"stage": "sft", "data": {"train": "a"}}, {"stage": "dpo", "data": {"train": "p"}}]}
    plan = load_plan(_recipe(tmp_path, body), ["dpo.beta=0.3", "gates.max_kl=2", "output_dir=" + str(tmp_path / "o")])
    assert plan.stage("dpo").config.beta == 0.3 and plan.recipe.gates.max_kl == 2.0
    assert plan.stage("sft").output_dir == tmp_path / "o" / "sft"
    with pytest.raises(ConfigError, match="is a stage"):
        load_plan(_recipe(tmp_path, body), ["dpo=1"])


def test_a_changed_stage_changes_its_fingerprint_and_every_later_one_only(tmp_path):
    train = tmp_path / "a.jsonl"
    train.write_text('{"prompt": "x", "completion": "y"}\n')
    body = {"stages": [{"stage": "sft", "data": {"train": "a.jsonl"}}, {"stage": "dpo", "data": {"train": "p"}},
                       {"name": "rl", "stage": "grpo", "data": {"train": "p"}, "rewards": [{"function": "exact_match"}]}]}
    path = _recipe(tmp_path, body)
    fps = [s.fingerprint for s in load_plan(path).stages]
    assert fps == [s.fingerprint for s in load_plan(path).stages]  # deterministic
    changed = [s.fingerprint for s in load_plan(path, ["dpo.beta=0.2"]).stages]
    assert changed[0] == fps[0] and changed[1] != fps[1] and changed[2] != fps[2]
    train.write_text('{"prompt": "x", "completion": "z"}\n')  # same config, other data: the first stage changes
    assert all(a != b for a, b in zip(fps, [s.fingerprint for s in load_plan(path).stages]))


def test_a_side_reward_model_stage_feeds_a_later_stage_without_moving_the_policy(tmp_path):
    body = {"stages": [{"stage": "sft", "data": {"train": "a"}},
                       {"stage": "rm", "data": {"train": "p"}},
                       {"stage": "ppo", "data": {"train": "q"}, "rewards": [{"reward_model": "{stage:rm}"}]}]}
    plan = load_plan(_recipe(tmp_path, body))
    ppo = plan.stage("ppo")
    assert ppo.parent == "sft" and ppo.values["adapter"].endswith("sft")
    assert ppo.values["rewards"][0]["reward_model"].endswith("pipeline/rm") and ppo.depends == ["rm"]


def test_gates_compare_targets_with_the_previous_stage_and_forgetting_with_the_base(tmp_path):
    from posttrain.pipeline.run import StageRecord, gate

    body = {"stages": [{"stage": "sft", "data": {"train": "a"}, "improves": ["t"]},
                       {"stage": "dpo", "data": {"train": "p"}, "improves": ["u"]}],
            "evals": {"tasks": [{"name": "t", "prompts": "t.jsonl", "rewards": [{"function": "exact_match"}]},
                                {"name": "u", "data": "u.jsonl"}]},
            "gates": {"min_task_gain": 0.05, "max_task_drop": 0.1, "max_kl": 0.5}}
    plan = load_plan(_recipe(tmp_path, body))
    base = {"metrics": {"task/t": 0.2, "task/u/loss": 2.0, "general/accuracy": 0.9, "general/perplexity": 10.0,
                        "general/kl_to_base": 0.0, "sycophancy/agrees": 0.3}}
    after_sft = {"metrics": {**base["metrics"], "task/t": 0.8, "general/kl_to_base": 0.2}}
    good = {"metrics": {**after_sft["metrics"], "task/u/loss": 1.5, "task/t": 0.75}}
    record = StageRecord("dpo", "dpo", eval=good)
    ok, reasons = gate(plan, plan.stage("dpo"), record, base, after_sft)
    assert ok, reasons
    for change, needle in [({"task/u/loss": 1.99}, "task/u/loss (target)"), ({"task/t": 0.6}, "task/t"),
                           ({"general/accuracy": 0.7}, "general/accuracy"), ({"general/kl_to_base": 0.6}, "kl_to_base"),
                           ({"general/perplexity": 16.0}, "perplexity"), ({"sycophancy/agrees": 0.45}, "sycophancy")]:
        record.eval = {"metrics": {**good["metrics"], **change}}
        ok, reasons = gate(plan, plan.stage("dpo"), record, base, after_sft)
        failed = [r for r in reasons if r.startswith("FAIL")]
        assert not ok and len(failed) == 1 and needle in failed[0], (change, reasons)
    record.eval, record.guard_stop = good, {"reason": "kl above 2"}
    ok, reasons = gate(plan, plan.stage("dpo"), record, base, after_sft)
    assert not ok and "guard stopped" in reasons[-1]


# ------------------------------------------------------------------------------------------------ running
def _run(recipe: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posttrain", "pipeline", str(recipe), *overrides],
                          capture_output=True, text=True, timeout=900)


def _trained(out: str) -> list[str]:
    return [line.split("stage ")[1].split(":")[0] for line in out.splitlines()
            if line.startswith("[pipeline] stage ") and " -m posttrain " in line]


def test_rerun_skips_finished_stages_and_an_edit_reruns_that_stage_and_the_later_ones(tmp_path, tiny_model_dir):
    recipe = _recipe(tmp_path, _tiny_recipe(tmp_path, tiny_model_dir, _prefs(tmp_path), on_fail="warn"))
    first = _run(recipe)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert _trained(first.stdout) == ["sft", "dpo", "polish"]
    run = tmp_path / "run"
    assert (run / "sft" / "adapter_config.json").exists() and (run / "polish" / "adapter_model.safetensors").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["trained"] * 3
    assert {"task/chosen/loss", "general/accuracy", "general/perplexity", "general/kl_to_base"} <= set(summary["base"])
    assert summary["base"]["general/kl_to_base"] == 0.0 and summary["stages"][0]["metrics"]["general/kl_to_base"] > 0
    assert all(s["peak_rss_bytes"] > 100 * 2**20 and s["seconds"] > 0 for s in summary["stages"])
    html = (run / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html and (run / "report.png").stat().st_size > 10_000
    adapter_mtime = (run / "dpo" / "adapter_model.safetensors").stat().st_mtime_ns

    dry = _run(recipe, "dpo.beta=0.25", "--dry-run")
    assert dry.returncode == 0 and [line.split()[-1] for line in dry.stdout.splitlines()[1:]] == ["skipped]", "[runs]", "[runs]"]

    again = _run(recipe)
    assert again.returncode == 0 and _trained(again.stdout) == [], again.stdout[-3000:]
    assert again.stdout.count("unchanged since its last run: skipped") == 3 and "evaluate dpo: cached" in again.stdout
    assert (run / "dpo" / "adapter_model.safetensors").stat().st_mtime_ns == adapter_mtime

    edited = _run(recipe, "dpo.beta=0.25")
    assert edited.returncode == 0, edited.stdout[-3000:] + edited.stderr[-3000:]
    assert _trained(edited.stdout) == ["dpo", "polish"]
    assert "stage sft: unchanged since its last run: skipped" in edited.stdout
    assert yaml.safe_load((run / ".pipeline" / "dpo.yaml").read_text())["beta"] == 0.25


def test_a_stage_trained_on_inverted_preferences_is_stopped_by_its_gate(tmp_path, tiny_model_dir):
    """The target task is the eval loss of the pairs' chosen answers: DPO on the right pairs lowers it, on
    swapped pairs raises it; the gate stops the pipeline there, keeps the outputs and names the stage."""
    good = _run(_recipe(tmp_path, _tiny_recipe(tmp_path, tiny_model_dir, _prefs(tmp_path))))
    assert good.returncode == 0, good.stdout[-3000:] + good.stderr[-3000:]
    assert "pass: task/chosen/loss (target)" in good.stdout

    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    body = _tiny_recipe(bad_dir, tiny_model_dir, _prefs(bad_dir, inverted=True))
    bad = _run(_recipe(bad_dir, body))
    assert bad.returncode == 1, bad.stdout[-3000:] + bad.stderr[-3000:]
    assert "FAIL: task/chosen/loss (target)" in bad.stdout and "stopped after stage 'dpo'" in bad.stdout
    assert "revisit stage 'dpo'" in bad.stdout and _trained(bad.stdout) == ["sft", "dpo"]
    summary = json.loads((bad_dir / "run" / "summary.json").read_text())
    assert summary["stopped_at"] == "dpo" and [s["status"] for s in summary["stages"]] == ["trained", "trained", "not run"]
    assert (bad_dir / "run" / "dpo" / "adapter_config.json").exists()
    assert "Stopped after stage `dpo`" in (bad_dir / "run" / "report.md").read_text()


def test_the_shipped_recipes_resolve():
    for path in sorted((EXAMPLES / "recipes").glob("*.yaml")):
        plan = load_plan(path)
        assert plan.stages and all(s.fingerprint for s in plan.stages), path
        for stage in plan.stages:
            train = stage.values["data"]["train"]
            assert Path(train).is_file(), f"{path.name}: stage {stage.name}: {train} missing"
