"""Preference stages on the real embedded SmolLM2-135M-Instruct (slow): DPO learns a checkable preference from an
SFT-style start, and a LoRA reward model learns to rank it and reloads with plain PEFT."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from posttrain.commands import load_config
from tests import ROOT_DIR

pytestmark = pytest.mark.slow

ROOT = ROOT_DIR
PREFS = ROOT / "examples" / "data" / "tiny_prefs.jsonl"


def metrics(out: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def split(tmp_path):
    rows = PREFS.read_text().splitlines()
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("\n".join(rows[:16]) + "\n")
    held.write_text("\n".join(rows[16:]) + "\n")  # countries never seen in training
    return train, held


def test_dpo_on_the_real_model_ranks_held_out_concise_answers_first(tmp_path):
    from posttrain.stages import dpo

    train, held = split(tmp_path)
    cfg = load_config("dpo", None, [f"data.train={train}", f"data.eval={held}", f"output_dir={tmp_path / 'dpo'}",
                                    "max_steps=6", "batch_size=4", "lr=1e-4", "beta=0.1", "max_length=128",
                                    "tensorboard=false", "warmup_ratio=0", "precision=fp32", "precompute_ref=true"])
    result = dpo.train(cfg)
    loss = metrics(result.output_dir, "train/loss")
    assert loss[1] == pytest.approx(math.log(2), abs=1e-4)
    assert loss[6] < loss[1]
    # held-out pairs: the implicit reward (beta x policy/reference log-ratio) ranks the concise answer first
    assert result.fit.eval_metrics["rewards/accuracy"] >= 0.875
    assert result.fit.eval_metrics["rewards/margins"] > 0


def test_reward_model_on_the_real_model_and_plain_peft_reload(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from posttrain.models.loading import load_tokenizer, resolve_model
    from posttrain.rewards.model import load_reward_model
    from posttrain.stages import rm

    train, held = split(tmp_path)
    cfg = load_config("rm", None, [f"data.train={train}", f"data.eval={held}", f"output_dir={tmp_path / 'rm'}",
                                   "max_steps=8", "batch_size=4", "lr=5e-4", "max_length=128", "tensorboard=false",
                                   "warmup_ratio=0", "precision=fp32"])
    result = rm.train(cfg)
    assert result.fit.eval_metrics["accuracy"] >= 0.875
    scorer = load_reward_model(result.output_dir)
    prompt = [{"role": "user", "content": "What is the capital of Mexico?"}]
    concise = [{"role": "assistant", "content": "Mexico City."}]
    rambling = [{"role": "assistant", "content": "Great question! Many people wonder about this. The capital of Mexico "
                 "is Mexico City. I hope this helps, and feel free to ask me anything else about geography!"}]
    ours = scorer.score(prompt, [concise, rambling])
    assert ours[0] > ours[1]
    tokenizer = load_tokenizer("smollm2-135m")
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model("smollm2-135m"), num_labels=1)
    base.config.pad_token_id = tokenizer.pad_token_id
    plain = PeftModel.from_pretrained(base, result.output_dir).eval()
    ids = tokenizer.apply_chat_template(prompt + concise, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert float(plain(input_ids=ids).logits[0, 0]) == pytest.approx(ours[0], abs=1e-3)
