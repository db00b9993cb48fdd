"""DPO, KTO and reward-model stages on a tiny random Llama: invariants that catch real bugs.

- Step 1 of a fresh run has policy == reference, so DPO logs exactly log 2 and KTO exactly 0.5 (weights 1):
  a wrong reference (e.g. the adapter left on, or the SFT start ignored) breaks that.
- Packed and padded forwards give the same per-sequence log-probs and rewards.
- Precomputed and online references give the same training losses.
- Accumulation: batch 4 x 1 and 2 x 2 give the same losses (units are pairs).
- The saved reward model loads with plain transformers / peft and scores exactly as during training.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.commands import load_config
from posttrain.data.preference import collate_pairs, load_pair_dataset
from posttrain.models.forward import sequence_logps, sequence_scores
from tests import ROOT_DIR

ROOT = ROOT_DIR
PREFS = ROOT / "examples" / "data" / "tiny_prefs.jsonl"
KTO = ROOT / "examples" / "data" / "tiny_kto.jsonl"
CHAT = ROOT / "examples" / "data" / "tiny_chat.jsonl"


def run(stage: str, model_dir, out, *overrides):
    import importlib

    data = {"dpo": PREFS, "rm": PREFS, "kto": KTO, "sft": CHAT}[stage]
    cfg = load_config(stage, None, [f"model={model_dir}", f"data.train={data}", f"output_dir={out}", "tensorboard=false",
                                    "warmup_ratio=0", "precision=fp32", "max_length=128", "lr_scheduler=constant", *overrides])
    return importlib.import_module(f"posttrain.stages.{stage}").train(cfg)


def metrics(out: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


@pytest.fixture(scope="module")
def pairs(tokenizer):
    return load_pair_dataset(PREFS, tokenizer, max_length=128)[0][:6]


def test_packed_and_padded_pairs_give_the_same_sequence_logps(tiny_model_dir, tokenizer, pairs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    with torch.no_grad():
        padded, n_pad = sequence_logps(model, collate_pairs(pairs, tokenizer.pad_token_id))
        packed, n_pack = sequence_logps(model, collate_pairs(pairs, tokenizer.pad_token_id, pack_capacity=128))
        # and each sequence alone, from full logits (the textbook computation)
        alone = []
        for seq in [p.chosen for p in pairs] + [p.rejected for p in pairs]:
            ids = torch.tensor([seq.input_ids])
            logp = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            alone.append(float(logp[torch.tensor(seq.loss_mask[1:], dtype=torch.bool)].sum()))
    torch.testing.assert_close(padded, torch.tensor(alone), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(packed, padded, atol=1e-4, rtol=1e-5)
    assert n_pad.tolist() == n_pack.tolist() == [sum(s.loss_mask[1:]) for s in [p.chosen for p in pairs] + [p.rejected for p in pairs]]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_starts_at_log2_and_learns_the_preference(tiny_model_dir, tmp_path, method):
    lr = "2e-3" if method == "lora" else "5e-4"
    result = run("dpo", tiny_model_dir, tmp_path / "dpo", f"method={method}", "max_steps=8", "batch_size=4", f"lr={lr}")
    loss = metrics(result.output_dir, "train/loss")
    assert loss[1] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    margins = metrics(result.output_dir, "train/rewards/margins")
    assert margins[8] > margins[1] and loss[8] < loss[1]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "kl", "logps/chosen", "logps/rejected"):
        assert f"train/{key}" in json.loads((result.output_dir / "metrics.jsonl").read_text().splitlines()[0])
    saved = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    assert (result.output_dir / saved).is_file()
    if method == "lora":  # only the trained adapter is saved, no reference adapter
        assert not (result.output_dir / "reference").exists()


def test_precomputed_reference_gives_the_same_losses_as_the_online_one(tiny_model_dir, tmp_path):
    common = ("max_steps=3", "batch_size=4", "lr=2e-3")
    online = run("dpo", tiny_model_dir, tmp_path / "online", *common)
    cached = run("dpo", tiny_model_dir, tmp_path / "pre", *common, "precompute_ref=true")
    assert (cached.output_dir / "reference_logps.safetensors").is_file()
    a, b = metrics(online.output_dir, "train/loss"), metrics(cached.output_dir, "train/loss")
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-6)


def test_dpo_accumulation_gives_the_same_losses(tiny_model_dir, tmp_path):
    a = run("dpo", tiny_model_dir, tmp_path / "4x1", "max_steps=2", "batch_size=4", "grad_accum=1", "lr=2e-3")
    b = run("dpo", tiny_model_dir, tmp_path / "2x2", "max_steps=2", "batch_size=2", "grad_accum=2", "lr=2e-3")
    for key in ("train/loss", "train/grad_norm", "train/rewards/margins"):
        la, lb = metrics(a.output_dir, key), metrics(b.output_dir, key)
        for step in la:
            assert la[step] == pytest.approx(lb[step], rel=1e-4, abs=1e-7), (key, step)


def test_dpo_from_an_sft_adapter_uses_it_as_the_reference(tiny_model_dir, tmp_path):
    sft = run("sft", tiny_model_dir, tmp_path / "sft", "max_steps=3", "lr=1e-2", "batch_size=4")
    dpo = run("dpo", tiny_model_dir, tmp_path / "dpo", f"adapter={sft.output_dir}", "max_steps=2", "batch_size=4")
    # Reference == the SFT model == the starting policy: log 2 exactly. (The raw base as reference would not be.)
    assert metrics(dpo.output_dir, "train/loss")[1] == pytest.approx(math.log(2), abs=1e-6)
    pre = run("dpo", tiny_model_dir, tmp_path / "dpo-pre", f"adapter={sft.output_dir}", "max_steps=2", "batch_size=4",
              "precompute_ref=true")
    assert metrics(pre.output_dir, "train/loss")[1] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("loss", ["ipo", "hinge", "robust", "simpo"])
def test_other_dpo_losses_train(tiny_model_dir, tmp_path, loss):
    extra = ("label_smoothing=0.1",) if loss == "robust" else ()
    result = run("dpo", tiny_model_dir, tmp_path / loss, f"loss={loss}", "max_steps=4", "batch_size=4", "lr=2e-3", *extra)
    margins = metrics(result.output_dir, "train/rewards/margins")
    assert margins[4] > margins[1]


def test_kto_starts_at_one_half_and_separates_the_labels(tiny_model_dir, tmp_path):
    result = run("kto", tiny_model_dir, tmp_path / "kto", "max_steps=8", "batch_size=4", "lr=2e-3")
    loss = metrics(result.output_dir, "train/loss")
    assert loss[1] == pytest.approx(0.5, abs=1e-6)  # r = 0 and z0 = 0: 1 - sigma(0) for every example
    assert loss[8] < loss[1]
    good, bad = metrics(result.output_dir, "train/rewards/desirable"), metrics(result.output_dir, "train/rewards/undesirable")
    assert good[8] - bad[8] > good[1] - bad[1]
    precomputed = run("kto", tiny_model_dir, tmp_path / "kto-pre", "max_steps=3", "batch_size=4", "lr=2e-3", "precompute_ref=true")
    for step, value in metrics(precomputed.output_dir, "train/loss").items():
        assert value == pytest.approx(loss[step], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_reward_model_learns_and_reloads_with_plain_transformers(tiny_model_dir, tmp_path, tokenizer, pairs, method):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from posttrain.rewards.model import load_reward_model

    result = run("rm", tiny_model_dir, tmp_path / "rm", f"method={method}", "max_steps=10", "batch_size=4", "lr=3e-3")
    acc = metrics(result.output_dir, "train/accuracy")
    loss = metrics(result.output_dir, "train/loss")
    assert loss[10] < loss[1] and acc[10] >= 0.75
    # Plain transformers (+ peft) load the artefact and score like training did.
    if method == "full":
        plain = AutoModelForSequenceClassification.from_pretrained(result.output_dir)
    else:
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
        base.config.pad_token_id = tokenizer.pad_token_id
        plain = PeftModel.from_pretrained(base, result.output_dir)
    plain.eval()
    rm = load_reward_model(result.output_dir, base=str(tiny_model_dir) if method != "full" else None)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    packed = collate_pairs(pairs, tokenizer.pad_token_id, pack_capacity=128)
    with torch.no_grad():
        trained = sequence_scores(result.model.eval(), batch)
        trained_packed = sequence_scores(result.model, packed)
        for i, seq in enumerate([p.chosen for p in pairs] + [p.rejected for p in pairs]):
            hf = plain(input_ids=torch.tensor([seq.input_ids])).logits[0, 0]
            assert float(hf) == pytest.approx(float(trained[i]), abs=1e-4)
    torch.testing.assert_close(trained_packed, trained, atol=1e-4, rtol=1e-4)
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    scores = rm.score(prompt, [[{"role": "assistant", "content": "Paris."}]])
    assert scores[0] == pytest.approx(float(trained[0]), abs=1e-4)


def test_score_command_prints_rewards_and_pairwise_accuracy(tiny_model_dir, tmp_path):
    result = run("rm", tiny_model_dir, tmp_path / "rm", "max_steps=2", "batch_size=4")
    out = tmp_path / "scores.jsonl"
    proc = subprocess.run([sys.executable, "-m", "posttrain", "score", f"reward_model={result.output_dir}",
                           f"model={tiny_model_dir}", f"data={PREFS}", f"output={out}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "pairwise accuracy" in proc.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 24 and {"reward_chosen", "reward_rejected", "chosen_preferred"} <= rows[0].keys()


def test_bad_preference_data_is_a_clear_cli_error(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "x", "rejected": "x"}\n')
    for stage in ("dpo", "rm"):
        proc = subprocess.run([sys.executable, "-m", "posttrain", stage, f"model={tiny_model_dir}", f"data.train={bad}",
                               f"output_dir={tmp_path / stage}"], capture_output=True, text=True)
        assert proc.returncode == 2
        assert "bad.jsonl:2: chosen and rejected are identical" in proc.stderr and "Traceback" not in proc.stderr
    kto_bad = tmp_path / "kto.jsonl"
    kto_bad.write_text('{"prompt": "q", "completion": "a", "label": "yes"}\n')
    proc = subprocess.run([sys.executable, "-m", "posttrain", "kto", f"model={tiny_model_dir}", f"data.train={kto_bad}"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "kto.jsonl:1: label: expected true or false, got 'yes'" in proc.stderr


def test_dpo_two_processes_with_a_sharded_precomputed_reference_match_one(tiny_model_dir, tmp_path):
    """2 gloo processes x 2 pairs == 1 process x 4 pairs, with the reference pass sharded and summed back."""
    import os

    one = run("dpo", tiny_model_dir, tmp_path / "one", "max_steps=2", "batch_size=4", "lr=2e-3", "precompute_ref=true")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           "-m", "posttrain", "dpo", f"model={tiny_model_dir}", f"data.train={PREFS}", f"output_dir={tmp_path / 'two'}",
           "tensorboard=false", "warmup_ratio=0", "precision=fp32", "max_length=128", "lr_scheduler=constant",
           "max_steps=2", "batch_size=2", "lr=2e-3", "precompute_ref=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    for key in ("train/loss", "train/rewards/margins"):
        a, b = metrics(one.output_dir, key), metrics(tmp_path / "two", key)
        for step in (1, 2):
            assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-7), (key, step)


@pytest.mark.parametrize("method, extra", [("prompt", ("precompute_ref=true",)), ("qlora", ()), ("prefix", ())])
def test_dpo_with_other_methods(tiny_model_dir, tmp_path, method, extra):
    result = run("dpo", tiny_model_dir, tmp_path / method, f"method={method}", "max_steps=3", "batch_size=4", "lr=5e-3",
                 "prompt.num_virtual_tokens=4", "prefix.num_virtual_tokens=4", *extra)
    loss = metrics(result.output_dir, "train/loss")
    if extra or method == "qlora":  # reference == initial policy (precomputed, or LoRA's B = 0 at the start)
        # QLoRA: 4.3e-5 from ln 2 on an AVX512-BF16 CPU (exact on the AVX2 machine before; not from the merged
        # LoRA path, which off still misses 1e-5): the grad-enabled policy forward and the no-grad reference
        # forward round the same fp32 products differently there
        assert loss[1] == pytest.approx(math.log(2), abs=1e-4 if method == "qlora" else 1e-5)
    assert all(math.isfinite(v) for v in loss.values())
