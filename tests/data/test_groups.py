"""Shared-prompt group batches (data.groups) equal the separate layout: log-probs, gradients, whole GRPO runs."""

from __future__ import annotations

import pytest
import torch

from posttrain.data.groups import collate_groups
from posttrain.data.preference import collate_sequences
from posttrain.data.tokenize import TokenizedExample
from posttrain.models.forward import sequence_logps

GROUPS = [([5, 6, 7, 8, 9], [[10, 11, 12], [13], [14, 15, 16, 17]]),
          ([20, 21], [[22, 23], [24, 25, 26], [27]]),
          ([30], [[31, 32], [33], [34, 35]])]  # a 1-token prompt has no shared prefix


def separate():
    return [TokenizedExample(p + c, [0] * len(p) + [1] * len(c)) for p, cs in GROUPS for c in cs]


@pytest.mark.parametrize("attn", ["packed_spans", "sdpa", "eager"])
@pytest.mark.parametrize("capacity", [None, 0, 64])
def test_shared_prompt_logps_and_gradients_equal_separate_sequences(tiny_model_dir, attn, capacity):
    from transformers import AutoModelForCausalLM

    from posttrain.models.attention import register

    register()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn)
    ref, ref_counts = sequence_logps(model, collate_sequences(separate(), 0, None))
    (ref * torch.arange(1, ref.numel() + 1)).sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    batch = collate_groups(GROUPS, 0, capacity)
    got, counts = sequence_logps(model, batch)
    (got * torch.arange(1, got.numel() + 1)).sum().backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(counts, ref_counts)
    for g, r in zip((p.grad for p in model.parameters()), ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_group_layout_saves_prompt_positions():
    batch = collate_groups(GROUPS, 0, None)
    separate_positions = sum(len(s.input_ids) for s in separate())
    shared_positions = int((batch["sequence_ids"] != -1).sum())
    # (P - 1) + sum(1 + C) per group instead of sum(P + C)
    assert shared_positions == (4 + 11) + (1 + 9) + (0 + 8)
    assert separate_positions == 23 + 12 + 8


def test_grpo_shared_and_separate_layouts_train_identically(tiny_model_dir, tmp_path):
    import importlib
    import json

    from posttrain.commands import load_config

    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"Count to {i}."}], "answer": str(i)}) + "\n"
                            for i in range(8)))
    runs = {}
    for share in (True, False):
        cfg = load_config("grpo", None, [f"model={tiny_model_dir}", f"data.train={data}", f"output_dir={tmp_path / str(share)}",
                                         "tensorboard=false", "precision=fp32", "batch_size=2", "num_generations=4",
                                         "sampling.max_new_tokens=6", "max_steps=3", "lr=1e-2", "guards.every=0",
                                         f"share_prompt={str(share).lower()}", "rewards=[{function: regex_match, kwargs: {pattern: '[aeiou]'}}]"])
        runs[share] = importlib.import_module("posttrain.stages.grpo").train(cfg).fit.history
    for a, b in zip(runs[True], runs[False], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert a["reward"] == pytest.approx(b["reward"])
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-3, abs=1e-6)
