"""Packing and the memory-lean loss must not change the math."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.data.collate import collate_sft
from posttrain.data.packing import best_fit_decreasing, collate_packed, pack_examples
from posttrain.data.tokenize import TokenizedExample
from posttrain.losses import causal_lm_loss, sft_loss
from posttrain.models.forward import target_logps


def random_examples(n: int, seed: int = 0, vocab: int = 1000) -> list[TokenizedExample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, 40)
        prompt = rng.randint(1, length - 1)
        out.append(TokenizedExample(input_ids=[rng.randrange(5, vocab) for _ in range(length)],
                                    loss_mask=[0] * prompt + [1] * (length - prompt)))
    return out


def test_best_fit_decreasing_by_hand():
    # capacity 10: 7 opens bin A (room 3); 6 opens B (room 4); 4 fits B exactly; 3 fits A exactly; 2 opens C.
    assert best_fit_decreasing([3, 7, 2, 6, 4], 10) == [[1, 0], [3, 4], [2]]
    with pytest.raises(ValueError):
        best_fit_decreasing([11], 10)


def test_packs_respect_capacity_and_keep_every_example():
    examples = random_examples(200)
    packs = pack_examples(examples, capacity=64)
    assert all(sum(len(e.input_ids) for e in p) <= 64 for p in packs)
    assert sorted(id(e) for p in packs for e in p) == sorted(id(e) for e in examples)
    # best-fit decreasing is near-optimal: within one row of the lower bound here
    lower = -(-sum(len(e.input_ids) for e in examples) // 64)
    assert len(packs) <= lower + 1


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()


def test_packed_logits_equal_unpacked_per_example(tiny):
    examples = random_examples(6, seed=1)
    packed = collate_packed([examples[:3], examples[3:]], pad_id=0)
    with torch.no_grad():
        logits = tiny(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                      position_ids=packed["position_ids"]).logits
        for row, group in enumerate([examples[:3], examples[3:]]):
            start = 0
            for ex in group:
                alone = tiny(input_ids=torch.tensor([ex.input_ids])).logits[0]
                n = len(ex.input_ids)
                torch.testing.assert_close(logits[row, start : start + n], alone, atol=1e-4, rtol=1e-4)
                start += n


def test_packed_loss_equals_unpacked_loss(tiny):
    examples = random_examples(9, seed=2)
    unpacked = collate_sft(examples, pad_id=0)
    packed = collate_packed(pack_examples(examples, 64), pad_id=0)
    with torch.no_grad():
        a, _ = sft_loss(target_logps(tiny, unpacked)[0])
        b, _ = sft_loss(target_logps(tiny, packed)[0])
    assert int((unpacked["labels"][:, 1:] != -100).sum()) == int((packed["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_chunked_loss_and_gradients_equal_full_logits(tiny_model_dir, chunk):
    examples = random_examples(4, seed=3)
    batch = collate_sft(examples, pad_id=0)
    grads = []
    losses = []
    for lean in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        if lean:
            loss, _ = sft_loss(target_logps(model, batch, chunk_size=chunk)[0])
        else:
            loss, _ = causal_lm_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                     batch["labels"])
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-5)
    for name in grads[0]:
        # fp32 summation order differs between chunkings: compare relative to the gradient's norm
        rel = (grads[1][name] - grads[0][name]).norm() / grads[0][name].norm().clamp_min(1e-12)
        assert rel < 1e-4, f"{name}: relative gradient error {rel:.2e}"


def test_head_is_restored_after_forward(tiny):
    head = tiny.lm_head
    target_logps(tiny, collate_sft(random_examples(2), pad_id=0))
    assert tiny.lm_head is head and tiny.get_output_embeddings() is head


def test_segments_come_from_restarting_positions():
    from posttrain.models.attention import segments_from_positions

    examples = random_examples(3, seed=4)
    batch = collate_packed([examples], pad_id=0)  # one row, no padding
    lengths = [len(e.input_ids) for e in examples]
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    assert segments_from_positions(batch["position_ids"]) == [list(zip(starts, starts[1:] + [sum(lengths)]))]
    padded = collate_packed([examples[:1], examples], pad_id=0)  # row 0 padded: its tail joins its only span
    assert segments_from_positions(padded["position_ids"])[0] == [(0, padded["input_ids"].shape[1])]


@pytest.mark.parametrize("grad", [False, True])
def test_segment_attention_equals_the_block_diagonal_mask(tiny_model_dir, grad):
    """sdpa_segments (per-sequence causal SDPA, no mask) vs sdpa with the (B, 1, T, T) mask: same loss and grads."""
    from posttrain.models.attention import NAME, register

    register()
    examples = random_examples(12, seed=5)
    batch = collate_packed(pack_examples(examples, 64), pad_id=0)
    results = []
    for attn in ("sdpa", NAME):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn)
        with torch.set_grad_enabled(grad):
            loss, _ = sft_loss(target_logps(model, batch)[0])
        if grad:
            loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()} if grad else {}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-5)
    for name, g in results[0][1].items():
        rel = (results[1][1][name] - g).norm() / g.norm().clamp_min(1e-12)
        assert rel < 1e-4, f"{name}: relative gradient error {rel:.2e}"
    # and equal to the unpacked batch
    unpacked, _ = sft_loss(target_logps(AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=NAME),
                                        collate_sft(examples, pad_id=0))[0])
    torch.testing.assert_close(unpacked.detach(), results[1][0], rtol=1e-5, atol=1e-4)


def test_segments_on_cuda_never_use_cudnn_attention():
    """cuDNN SDPA plans a graph per new span length (measured 1.6 ms CPU per call on an H200): the per-span
    kernel must exclude it on CUDA and leave the global backend flags as they were afterwards."""
    from posttrain.models.attention import _without_cudnn

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with _without_cudnn(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
