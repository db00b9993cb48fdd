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
