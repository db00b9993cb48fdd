"""The SFT throughput benchmark (benchmarks/sft_throughput.py): its accounting, and a 2-step run on the tiny model.

The benchmark is a script, not part of the package, so it is loaded from its path. TRL is a benchmark-only
dependency (the `bench` extra): the TRL side is skipped when it is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "sft_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("sft_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sft_throughput"] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_generated_data_is_deterministic_and_chat_shaped(bench):
    rows = bench.make_conversations(50, seed=3)
    assert rows == bench.make_conversations(50, seed=3)
    assert rows != bench.make_conversations(50, seed=4)
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        body = roles[1:] if roles[0] == "system" else roles
        assert body == ["user", "assistant"] * (len(body) // 2) and body


def test_training_template_marks_exactly_posttrains_targets(bench, tokenizer):
    """TRL's assistant_only_loss mask (from the {% generation %} template) equals posttrain's loss mask."""
    from posttrain.data.formats import normalize_sft
    from posttrain.data.tokenize import tokenize_sft

    for row in bench.make_conversations(20, seed=0):
        ours = tokenize_sft(normalize_sft(row), tokenizer)
        assert tokenizer.apply_chat_template(row["messages"], tokenize=False) == tokenizer.apply_chat_template(
            row["messages"], tokenize=False, chat_template=bench.CHATML_TRAINING_TEMPLATE)
        theirs = tokenizer.apply_chat_template(row["messages"], chat_template=bench.CHATML_TRAINING_TEMPLATE,
                                               return_dict=True, return_assistant_tokens_mask=True)
        assert theirs["input_ids"] == ours.input_ids
        assert theirs["assistant_masks"] == ours.loss_mask


def test_model_shape_counts_the_real_parameters(bench, tiny_model_dir):
    """Body matmul weights + output head + norms = the model's parameters; LoRA count = PEFT's trainable count."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = json.loads((tiny_model_dir / "config.json").read_text())
    shape = bench.ModelShape.from_config(config, lora_r=16)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert shape.body_params + shape.head_params + norms == sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
    assert shape.lora_params == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_flops_per_trained_token_by_hand(bench):
    # 1 layer, attention dim 4, body 100 params, head 10, LoRA 5; two examples of 3 and 5 tokens, 4 trained.
    shape = bench.ModelShape(layers=1, hidden=4, attn_dim=4, body_params=100, head_params=10, lora_params=5)
    stats = bench.DataStats(rows=2, median_tokens=4, p90_tokens=5, max_tokens_before_truncation=5,
                            truncated_rows=0, processed_tokens=8, trained_tokens=4, sum_sq_lengths=9 + 25,
                            packed_rows=1)
    attention = 3 * 2 * 1 * 4 * 34  # training x (QK + AV, causal) x layers x attn_dim x sum L^2
    assert bench.flops_per_trained_token(shape, stats, "full") == (6 * 100 * 8 + 6 * 10 * 4 + attention) / 4
    lora = (4 * 100 * 8 + 6 * 5 * 8 + 4 * 10 * 4 + attention) / 4
    assert bench.flops_per_trained_token(shape, stats, "lora") == lora
    assert bench.flops_per_trained_token(shape, stats, "qlora") == lora


def _run(bench, tiny_model_dir, out: Path, tools: str) -> dict:
    bench.main(["--model", str(tiny_model_dir), "--tools", tools, "--methods", "lora", "--steps", "1",
                "--warmup", "1", "--batch-size", "2", "--max-length", "128", "--rows", "24", "--eval-rows", "2",
                "--peak-size", "256", "--trl-bf16", "off", "--device", "cpu", "--out", str(out)])
    return json.loads((out / "results.json").read_text())


def test_posttrain_side_runs_two_steps(bench, tiny_model_dir, tmp_path):
    report = _run(bench, tiny_model_dir, tmp_path, "posttrain")
    (run,) = report["runs"]
    assert run["setup"] == "posttrain" and "error" not in run, run
    assert len(run["step_records"]) == 2 and run["summary"]["steps_timed"] == 1
    assert run["summary"]["trained_tokens_per_s"] > 0 and run["peak_rss_mb"] > 0
    assert run["summary"]["tokens_seen"] == sum(s["trained_tokens"] for s in run["step_records"])
    assert run["eval_loss"] > 0
    assert "| lora | posttrain |" in (tmp_path / "results.md").read_text()


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL not installed (pip install -e '.[bench]')")
def test_trl_side_runs_and_trains_the_same_tokens(bench, tiny_model_dir, tmp_path):
    report = _run(bench, tiny_model_dir, tmp_path, "trl")
    runs = {r["setup"]: r for r in report["runs"]}
    assert set(runs) == {"trl-default", "trl-best"}
    for run in runs.values():
        assert "error" not in run, run
        assert run["summary"]["trained_tokens_per_s"] > 0
    # Unpacked, TRL keeps the rows in order: the trained tokens of its prepared data equal posttrain's count.
    assert runs["trl-default"]["prepared_trained_tokens"] == report["data"]["trained_tokens"]


# ---------------------------------------------------------------------------------------------- GRPO benchmark
GRPO_SCRIPT = ROOT / "benchmarks" / "grpo_throughput.py"


@pytest.fixture(scope="module")
def grpo_bench():
    spec = importlib.util.spec_from_file_location("grpo_throughput", GRPO_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["grpo_throughput"] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_grpo_reward_reads_the_last_number(grpo_bench):
    assert grpo_bench.arith_reward(None, "15 - 4 = 11", answer="11") == 1.0
    assert grpo_bench.arith_reward(None, "11 apples, so 12", answer="11") == 0.0
    assert grpo_bench.arith_reward(None, "no number", answer="3") == 0.0
    assert grpo_bench.trl_arith_reward([None] * 2, [[{"role": "assistant", "content": "It is 7."}], "-2"],
                                       answer=["7", "-2"]) == [1.0, 1.0]


def _run_grpo(grpo_bench, tiny_model_dir, out: Path, contenders: str, parts: str) -> dict:
    grpo_bench.main(["--model", str(tiny_model_dir), "--contenders", contenders, "--parts", parts, "--steps", "1",
                     "--warmup", "1", "--prompts-per-step", "2", "--num-generations", "2", "--max-new-tokens", "6",
                     "--threads", "1", "--device", "cpu", "--out", str(out / "grpo.json")])
    return json.loads((out / "grpo.json").read_text())


def _check_grpo_run(run: dict, completions_per_step: int) -> None:
    assert "error" not in run, run
    assert len(run["steps"]) == 2 and run["summary"]["steps_timed"] == 1
    s = run["summary"]
    for key in ("step_seconds", "rollout_seconds_per_step", "rollout_tokens_per_s", "trained_tokens_per_s"):
        assert s[key] > 0, key
    assert 1 <= s["mean_completion_length"] <= 6
    for step in run["steps"]:  # every completion token is trained on (up to and including the EOS)
        assert completions_per_step <= step["trained_tokens"] == step["rollout_tokens"] <= 6 * completions_per_step
    assert run["peak_rss_mb"] > 0 and run["trainable_params"] > 0


def test_grpo_benchmark_posttrain_and_rollout(grpo_bench, tiny_model_dir, tmp_path):
    report = _run_grpo(grpo_bench, tiny_model_dir, tmp_path, "posttrain", "grpo,rollout")
    assert report["versions"]["torch"] and report["machine"]["cpu_count"]
    (run,) = report["grpo"]["runs"]
    assert run["contender"] == "posttrain"
    _check_grpo_run(run, completions_per_step=4)
    assert report["grpo"]["ratios_posttrain_over_trl"] is None
    methods = report["rollout"]["methods"]
    assert set(methods) == {"posttrain-engine", "generate-loop", "generate-batched"}
    for m in methods.values():
        assert m["completions"] == 4 and 4 <= m["completion_tokens"] <= 24 and m["tokens_per_s"] > 0
    assert set(report["rollout"]["ratios_engine_over"]) == {"generate-loop", "generate-batched"}
    assert "| posttrain |" in (tmp_path / "grpo.md").read_text()


def test_grpo_benchmark_trl_side_matches_the_setup(grpo_bench, tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    report = _run_grpo(grpo_bench, tiny_model_dir, tmp_path, "trl", "grpo")
    (run,) = report["grpo"]["runs"]
    assert run["contender"] == "trl"
    _check_grpo_run(run, completions_per_step=4)
    assert run["same_prompt_tokens_as_posttrain"] is True
    assert run["settings"]["per_device_train_batch_size"] == 4 and run["settings"]["generation_batch_size"] == 4
    assert run["settings"]["gradient_checkpointing"] is False and run["settings"]["bf16"] is False
    # LoRA r 16 on all 7 linear layers of the 2 tiny layers (hidden 64, kv 32, mlp 128): what posttrain trains too
    linears = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    assert run["trainable_params"] == 2 * 16 * sum(i + o for i, o in linears)


def test_data_throughput_smoke(tmp_path):
    """The data benchmark runs end to end on a small file and finds the planted duplicates."""
    import subprocess

    out = tmp_path / "data.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_throughput.py"), "--rows", "1500",
                           "--work", str(tmp_path), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["dedup"]["exact_found"] >= res["planted"]["planted_exact"]
    assert res["dedup"]["near_found"] >= 0.7 * res["planted"]["planted_near"]
    assert res["dedup"]["near_recall"] >= 0.9 and res["dedup"]["near_unplanted"] == 0
    assert res["clean"]["kept"] + sum(res["clean"]["reasons"].values()) == 1500
    assert res["dedup"]["rows_per_s"] > 0 and res["dedup"]["peak_rss_mb"] > 0


def test_step_breakdown_accounts_for_every_matmul_flop(tiny_model_dir, tmp_path):
    """benchmarks/step_breakdown.py on the tiny model: categories sum to the profiled time, and the matmul FLOPs
    it reads from the recorded shapes include the body's 4N per token (forward + input gradients)."""
    spec = importlib.util.spec_from_file_location("step_breakdown", ROOT / "benchmarks" / "step_breakdown.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "breakdown.json"
    result = module.main(["--model", str(tiny_model_dir), "--rows", "120", "--peak-size", "256", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    cats = {c["category"]: c for c in result["categories"]}
    assert abs(sum(c["seconds"] for c in cats.values()) - result["profiled_self_s"]) < 0.05
    body = cats["body matmuls (q, k, v, o, gate, up, down)"]
    assert body["tflop"] > 0 and cats["head matmuls"]["tflop"] > 0
    assert result["targets"] > 0 and result["loss"] > 0
