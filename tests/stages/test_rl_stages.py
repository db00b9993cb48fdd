"""GRPO and PPO stages on a tiny random Llama: end to end, resume, guards, multi-update and config errors.

The reward is a user function in a file (so it runs in the sandboxed worker subprocess, as user code must),
chosen to vary between completions of a prompt so every group has a learning signal.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.commands import load_config
from posttrain.errors import ConfigError

REWARD = '''
def length_mod(prompt, completion, **row):
    return float(len(completion) % 7) / 6.0


def informative(prompt, completion, **row):
    return 1.0 if len(completion.split()) >= 3 else 0.0
'''


@pytest.fixture(scope="module")
def rl_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("rl")
    (d / "my_rewards.py").write_text(REWARD)
    rows = [{"prompt": [{"role": "user", "content": f"Count to {i}."}], "answer": str(i)} for i in range(12)]
    rows += [{"prompt": f"Plain text prompt number {i}:", "answer": str(i)} for i in range(4)]
    (d / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def run(stage: str, model_dir, files: Path, out, *overrides):
    cfg = load_config(stage, None, [
        f"model={model_dir}", f"data.train={files / 'prompts.jsonl'}", f"data.eval={files / 'prompts.jsonl'}",
        f"output_dir={out}", "tensorboard=false", "precision=fp32", "batch_size=2", "num_generations=4",
        "sampling.max_new_tokens=6", "max_steps=4", "lr=1e-3", "guards.every=2",
        f"rewards=[{{function: '{files / 'my_rewards.py'}:length_mod'}}]", *overrides])
    return importlib.import_module(f"posttrain.stages.{stage}").train(cfg)


def losses(result) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in result.fit.history}


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_rl_stage_end_to_end_and_artefacts(stage, tiny_model_dir, rl_files, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / stage
    result = run(stage, tiny_model_dir, rl_files, out)
    assert result.stopped is None and result.fit.steps == 4
    last = result.fit.history[-1]
    for key in ("reward", "reward/length_mod", "kl", "length/mean", "entropy", "duplicates/share", "rollout/tokens_per_s", "rollout/share"):
        assert key in last, key
    assert 0 < last["rollout/share"] < 1
    assert result.fit.history[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # LoRA starts as the reference
    assert "heldout/reward" in result.fit.history[0] and "heldout/reward" in result.fit.history[2]  # guards.every=2
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(result).values())
    # Plain PEFT loads the adapter; the trained adapter changed the model.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, str(out))
    assert any(n.endswith("lora_B.default.weight") and p.abs().sum() > 0 for n, p in model.named_parameters())
    assert (out / "report.md").is_file() and (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if stage == "ppo":
        head = load_file(str(out / "value_head.safetensors"))
        assert set(head) == {"weight", "bias"} and head["weight"].abs().sum() > 0  # the value head trained
        assert not any("value_head" in k for k in load_file(str(out / "adapter_model.safetensors")))


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_resume_repeats_the_uninterrupted_run(stage, tiny_model_dir, rl_files, tmp_path):
    full = run(stage, tiny_model_dir, rl_files, tmp_path / "full", "save_every=2")
    # Interrupted after step 2: only the step-2 checkpoint survives, then resume.
    part = tmp_path / "part"
    run(stage, tiny_model_dir, rl_files, part, "save_every=2", "max_steps=4")
    ckpts = sorted((part / "checkpoints").iterdir())
    for c in ckpts:
        if not c.name.endswith("2"):
            import shutil

            shutil.rmtree(c)
    resumed = run(stage, tiny_model_dir, rl_files, part, "save_every=2", "resume=true")
    expected, got = losses(full), losses(resumed)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-7), step
    for key in ("reward", "kl", "length/mean"):
        assert resumed.fit.history[-1][key] == pytest.approx(full.fit.history[-1][key], rel=1e-5, abs=1e-7)


def test_guard_stop_keeps_the_last_passing_policy(tiny_model_dir, rl_files, tmp_path):
    # length/mean is always >= 1 token, so the rule trips at the first step it watches (step 3): the policy that
    # generated step 2's rollout (after 1 update) is the last good one and is what gets saved.
    rules = "guards.rules=[{metric: length/mean, max: 0.5, action: stop, after: 2}]"
    stopped = run("grpo", tiny_model_dir, rl_files, tmp_path / "stopped", rules)
    assert stopped.stopped is not None and "length/mean" in stopped.stopped
    assert stopped.fit.steps == 2  # steps 1 and 2 were applied, step 3's update was not
    info = json.loads((tmp_path / "stopped" / "guard_stop.json").read_text())
    assert info == {"reason": stopped.stopped, "stopped_at_step": 3, "kept_step": 2}
    status = json.loads((tmp_path / "stopped" / "run.json").read_text())  # what `posttrain ui` shows
    assert (status["status"], status["reason"], status["step"]) == ("stopped", stopped.stopped, 2)
    report = (tmp_path / "stopped" / "report.md").read_text()
    assert "length/mean" in report and "3" in report
    run("grpo", tiny_model_dir, rl_files, tmp_path / "one", "max_steps=1")
    kept = load_file(str(tmp_path / "stopped" / "adapter_model.safetensors"))
    after_one = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    assert kept.keys() == after_one.keys()
    for k in kept:
        torch.testing.assert_close(kept[k], after_one[k], rtol=1e-5, atol=1e-7)


def test_guard_trips_are_counted_in_the_logged_metrics(tiny_model_dir, rl_files, tmp_path):
    # A warn rule fires once per streak: length/mean >= 1 > 0.5 from step 1 on, so one event, logged from step 1.
    rules = "guards.rules=[{metric: length/mean, max: 0.5, action: warn}]"
    run("grpo", tiny_model_dir, rl_files, tmp_path / "w", rules, "max_steps=2")
    rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/guards/fired"] for r in rows if "train/loss" in r] == [1.0, 1.0]


def test_guard_rewards_and_gap_are_logged(tiny_model_dir, rl_files, tmp_path):
    guards = f"guards.rewards=[{{function: '{rl_files / 'my_rewards.py'}:informative'}}]"
    result = run("grpo", tiny_model_dir, rl_files, tmp_path / "g", guards, "max_steps=2", "guards.every=1")
    first = result.fit.history[0]
    assert "guard/informative" in first
    assert first["guard/gap"] == pytest.approx(first["heldout/reward"] - first["guard"])


def test_grpo_several_iterations_move_the_ratio(tiny_model_dir, rl_files, tmp_path):
    result = run("grpo", tiny_model_dir, rl_files, tmp_path / "it", "num_iterations=3", "max_steps=2", "lr=5e-2")
    # Metrics are averaged over the 3 updates; the first has ratio exactly 1, later ones move away from it.
    assert any(abs(h["ratio"] - 1.0) > 1e-6 for h in result.fit.history)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_grpo_at_beta_zero_skips_the_reference_pass_and_trains_the_same(method, tiny_model_dir, rl_files, tmp_path, monkeypatch):
    # At beta 0 the KL is not in the loss: the default (measure_kl auto) runs no reference pass, keeps no frozen
    # copy for a full fine-tune and logs no kl, and must train exactly like a run that measures it (same rollouts,
    # same losses, same weights). A guard rule on kl brings the measurement back.
    from posttrain.rl.objective import RLObjective

    passes = []
    real = RLObjective.reference_logps
    monkeypatch.setattr(RLObjective, "reference_logps", lambda self, m, b: passes.append(1) or real(self, m, b))
    common = ("beta=0", f"method={method}", "max_steps=3", "guards.every=0")
    skipped = run("grpo", tiny_model_dir, rl_files, tmp_path / "auto", *common)
    assert passes == []
    assert skipped.fit.history and all("kl" not in h and "update/kl" not in h for h in skipped.fit.history)
    measured = run("grpo", tiny_model_dir, rl_files, tmp_path / "always", *common, "measure_kl=always")
    assert len(passes) == 3  # one micro-batch (batch_size 2 prompts) per step, 3 steps
    assert all("kl" in h and "update/kl" in h for h in measured.fit.history)
    for a, b in zip(skipped.fit.history, measured.fit.history, strict=True):
        for key in ("loss", "reward", "length/mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-8), key
    if method == "lora":
        got, want = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("auto", "always"))
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    passes.clear()
    guarded = run("grpo", tiny_model_dir, rl_files, tmp_path / "guarded", *common, "max_steps=1",
                  "guards.rules=[{metric: kl/trend, max: 1.0}]")
    assert passes and "kl" in guarded.fit.history[0]


@pytest.mark.parametrize("override, message", [
    ("rewards=[]", "rewards: required"),
    ("rewards=[{function: no_such_module_xyz:f}]", "rewards[0]"),
    ("rewards=[{function: numeric_match, wieght: 2}]", "did you mean weight"),
    ("method=prompt", "RL stages support full, lora and qlora"),
    ("num_generations=1", "num_generations"),
])
def test_config_errors_name_the_key(override, message, tiny_model_dir, rl_files, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)):
        run("grpo", tiny_model_dir, rl_files, tmp_path / "bad", override)


def test_cli_reports_a_bad_reward_without_traceback(tiny_model_dir, rl_files, tmp_path, capsys):
    from posttrain.cli import main

    code = main(["grpo", f"model={tiny_model_dir}", f"data.train={rl_files / 'prompts.jsonl'}", f"output_dir={tmp_path}",
                 "rewards=[{function: 'missing_file.py:f'}]"])
    assert code == 2
    err = capsys.readouterr().err
    assert "rewards[0]" in err and "Traceback" not in err


def test_grpo_runs_on_two_processes(tiny_model_dir, rl_files, tmp_path):
    """2 gloo processes: prompts sharded, rollout metrics and held-out rewards reduced across processes, one adapter.
    (Not an equality test: each process samples its own prompts with its own seed.)"""
    import os
    import subprocess
    import sys

    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
           "-m", "posttrain", "grpo", f"model={tiny_model_dir}", f"data.train={rl_files / 'prompts.jsonl'}",
           f"data.eval={rl_files / 'prompts.jsonl'}", f"output_dir={out}", "tensorboard=false", "precision=fp32",
           "batch_size=1", "num_generations=4", "sampling.max_new_tokens=6", "max_steps=2", "lr=1e-3", "guards.every=1",
           f"rewards=[{{function: '{rl_files / 'my_rewards.py'}:length_mod'}}]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert all("train/heldout/reward" in r and "train/reward" in r for r in train)
    assert (out / "adapter_model.safetensors").is_file() and (out / "report.md").is_file()


def test_reward_sources_see_row_columns_and_reward_models_score_like_posttrain_score(tiny_model_dir, rl_files, tmp_path):
    """A reward-model source scores exactly as load_reward_model(...).score does, and functions get the row's columns."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.rewards.model import load_reward_model
    from posttrain.rewards.registry import RewardSet

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    rm.save_pretrained(tmp_path / "rm")
    from posttrain.models.loading import load_tokenizer

    load_tokenizer(str(tiny_model_dir)).save_pretrained(tmp_path / "rm")
    (tmp_path / "cols.py").write_text("def answer_value(prompt, completion, answer, **row):\n    return float(answer)\n")
    rewards = RewardSet.from_config([{"reward_model": str(tmp_path / "rm"), "weight": 0.5},
                                     {"function": f"{tmp_path / 'cols.py'}:answer_value"}], device=torch.device("cpu"))
    try:
        prompts = [[{"role": "user", "content": "Count to 3."}], "Plain prompt:"]
        totals, per = rewards.score(prompts, ["1 2 3", "more text"], [{"answer": "3"}, {"answer": "7"}])
    finally:
        rewards.close()
    direct = load_reward_model(tmp_path / "rm")
    expected = [direct.score(prompts[0], [[{"role": "assistant", "content": "1 2 3"}]])[0],
                direct.score(prompts[1], ["more text"])[0]]
    assert per["reward_model"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert per["answer_value"] == [3.0, 7.0]
    assert totals == pytest.approx([0.5 * expected[0] + 3.0, 0.5 * expected[1] + 7.0], rel=1e-5, abs=1e-6)
