"""Packing and the memory-lean loss must not change the math."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.data.batching import best_fit_decreasing, collate_packed, collate_sft, pack_examples
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
    """packed_spans (per-sequence causal SDPA, no mask) vs sdpa with the (B, 1, T, T) mask: same loss and grads."""
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


def _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, scale=None):
    """What flash-attention's varlen kernel computes, per sequence of the flattened (N, H, D) tensors (the
    signature of torch 2.9-2.11's ``varlen_attn``; the CUDA kernel itself cannot run on this machine)."""
    assert cu_seq_q is cu_seq_k and cu_seq_q.dtype == torch.int32 and is_causal
    offsets = cu_seq_q.tolist()
    assert offsets[0] == 0 and offsets[-1] == query.shape[0]
    assert max_q == max_k == max(b - a for a, b in zip(offsets, offsets[1:]))
    assert query.shape[1] == key.shape[1], "this signature has no enable_gqa: K/V must arrive repeated"
    parts = [torch.nn.functional.scaled_dot_product_attention(
        query[a:b].transpose(0, 1), key[a:b].transpose(0, 1), value[a:b].transpose(0, 1), is_causal=True,
        scale=scale).transpose(0, 1) for a, b in zip(offsets, offsets[1:])]
    return torch.cat(parts)


def _reference_varlen_window(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                             window_size=(-1, -1), enable_gqa=False):
    """torch 2.13's signature: causal is window (-1, 0), grouped K/V heads stay grouped."""
    assert window_size == (-1, 0) and enable_gqa == (query.shape[1] != key.shape[1])
    groups = query.shape[1] // key.shape[1]
    return _reference_varlen(query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), cu_seq_q,
                             cu_seq_k, max_q, max_k, is_causal=True, scale=scale)


@pytest.mark.parametrize("kernel", [_reference_varlen, _reference_varlen_window])
def test_varlen_batch_equals_per_span_attention(tiny_model_dir, kernel, monkeypatch):
    """On CUDA the packed batch runs as one varlen call: the flattening, the cumulative offsets, the GQA
    handling and the reshaping back must give the per-span path's loss and gradients (tiny GQA Llama: 4 query
    heads, 2 K/V heads)."""
    from posttrain.models import attention

    attention.register()
    monkeypatch.setattr(attention, "_varlen_kernel", lambda: kernel)
    calls = []
    original = attention._varlen_segments
    monkeypatch.setattr(attention, "_varlen_segments", lambda *a: calls.append(1) or original(*a))
    batch = collate_packed(pack_examples(random_examples(12, seed=7), 64), pad_id=0)
    results = []
    for varlen in (False, True):
        monkeypatch.setattr(attention, "_varlen_applicable", lambda q, d, s, on=varlen: on and attention._tiles(s, q.shape[2]))
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention.NAME)
        loss, _ = sft_loss(target_logps(model, batch)[0])
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert len(calls) == 2, "one varlen call per layer"
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-5)
    for name, g in results[0][1].items():
        rel = (results[1][1][name] - g).norm() / g.norm().clamp_min(1e-12)
        assert rel < 1e-5, f"{name}: relative gradient error {rel:.2e}"


def test_varlen_offsets_and_when_it_applies(monkeypatch):
    from posttrain.models import attention

    segments = [[(0, 3), (3, 8)], [(0, 8)], [(0, 5), (5, 6), (6, 8)]]
    assert attention.cumulative_offsets(segments, 8) == ([0, 3, 8, 16, 21, 22, 24], 8)
    q = torch.zeros(3, 2, 8, 4)
    assert not attention._varlen_applicable(q, 0.0, segments)  # CPU (and fp32): per-span SDPA
    assert not attention._varlen_applicable(q.to("meta", torch.bfloat16), 0.0, segments)  # not CUDA


def test_varlen_failure_falls_back_to_per_span_once(monkeypatch):
    """A kernel error (an old GPU, an unsupported head size) warns once and switches to the per-span path."""
    from posttrain.models import attention

    def broken(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, scale=None):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

    monkeypatch.setattr(attention, "_varlen_kernel", lambda: broken)
    monkeypatch.setattr(attention, "_varlen_failed", None)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    segments = [[(0, 2), (2, 6)], [(0, 6)]]
    with pytest.warns(RuntimeWarning, match="Ampere"):
        assert attention._varlen_segments(q, k, v, segments, None) is None
    assert "Ampere" in attention._varlen_failed
    assert not attention._varlen_applicable(q.to("meta", torch.bfloat16), 0.0, segments)
    out, _ = attention.packed_spans_forward(None, q, k, v, None, segments=segments)
    expected, _ = attention._split_segments(q, k, v, segments, 0.0, None)
    torch.testing.assert_close(out, expected)


def test_varlen_without_scale_serves_the_default_scaling_only(monkeypatch):
    """torch 2.9's varlen_attn has no ``scale`` (always 1/sqrt(head_dim)) and may return (out, lse): the default
    scaling transformers passes for Llama must still take the one-call path, another scaling the per-span one."""
    from posttrain.models import attention

    def early(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None):
        out = _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=is_causal)
        return out, torch.zeros(())

    monkeypatch.setattr(attention, "_varlen_kernel", lambda: early)
    monkeypatch.setattr(attention, "_varlen_failed", None)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    segments = [[(0, 2), (2, 6)], [(0, 6)]]
    expected, _ = attention._split_segments(q, k, v, segments, 0.0, 8**-0.5)
    out, _ = attention._varlen_segments(q, k, v, segments, 8**-0.5)
    torch.testing.assert_close(out, expected)
    assert attention._varlen_failed is None
    with pytest.warns(RuntimeWarning, match="no scale"):
        assert attention._varlen_segments(q, k, v, segments, 0.5) is None
    assert "no scale" in attention._varlen_failed


def _attention_grads(attend, q, k, v, grad_out):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = attend(q, k, v)
    out.backward(grad_out.to(out.dtype))
    return [out.detach().double()] + [t.grad.double() for t in (q, k, v)]


@pytest.mark.parametrize("heads,kv_heads,length", [(9, 3, 57), (4, 4, 33), (6, 2, 1), (2, 1, 130), (6, 3, 300)])
def test_cpu_bf16_span_attention_is_as_accurate_as_the_flash_kernel(heads, kv_heads, length):
    """The matrix-product attention of one causal span (bf16, grouped heads, 1-3 row blocks) against float64:
    the output and every gradient within 2x the CPU flash kernel's own error (plus half a bf16 ulp)."""
    import torch.nn.functional as F

    from posttrain.models.attention import _CausalSpanAttention

    torch.manual_seed(0)
    # logits up to ~+-15 like a trained model's, where bf16 scores would lose precision
    q = (torch.randn(heads, length, 16) * 2).bfloat16()
    k = (torch.randn(kv_heads, length, 16) * 2).bfloat16()
    v = torch.randn(kv_heads, length, 16).bfloat16()
    grad_out = torch.randn(heads, length, 16).bfloat16()

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=0.25,
                                              enable_gqa=heads != kv_heads)[0]

    exact = _attention_grads(sdpa, q.double(), k.double(), v.double(), grad_out)
    flash = _attention_grads(sdpa, q, k, v, grad_out)
    ours = _attention_grads(lambda q, k, v: _CausalSpanAttention.apply(q, k, v, 0.25), q, k, v, grad_out)
    for name, e, f, o in zip(["out", "dq", "dk", "dv"], exact, flash, ours):
        scale = e.abs().max()
        if scale == 0:  # one token: the scores' gradient is exactly zero
            assert o.abs().max() < 1e-5
            continue
        err_flash, err_ours = (f - e).abs().max() / scale, (o - e).abs().max() / scale
        assert err_ours <= 2 * err_flash + 2e-3, f"{name}: {err_ours:.2e} vs flash {err_flash:.2e}"


def test_segments_take_the_cpu_bf16_span_products_with_and_without_gradients(monkeypatch):
    """packed_spans on a bf16 CPU batch goes through the matrix-product attention; its output and gradients
    match the flash kernel's (POSTTRAIN_CPU_ATTENTION=sdpa) to bf16 precision, and a no-grad pass (a reference
    model's) gives the training pass's output bit for bit. fp32 or dropout keep plain SDPA."""
    from posttrain.models import attention

    calls = []
    original = attention._CausalSpanAttention.apply
    monkeypatch.setattr(attention._CausalSpanAttention, "apply", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(1)
    segments = [[(0, 20), (20, 48)], [(0, 48)]]
    q = torch.randn(2, 6, 48, 16).bfloat16()
    k, v = torch.randn(2, 2, 48, 16).bfloat16(), torch.randn(2, 2, 48, 16).bfloat16()
    grad_out = torch.randn(2, 48, 6, 16)

    def run():
        return _attention_grads(lambda q, k, v: attention.packed_spans_forward(None, q, k, v, None,
                                                                                segments=segments)[0], q, k, v, grad_out)

    ours = run()
    assert len(calls) == 3
    monkeypatch.setenv("POSTTRAIN_CPU_ATTENTION", "sdpa")
    flash = run()
    assert len(calls) == 3
    for o, f in zip(ours, flash):
        assert (o - f).abs().max() <= 0.02 * f.abs().max()
    monkeypatch.delenv("POSTTRAIN_CPU_ATTENTION")
    with torch.no_grad():
        no_grad = attention.packed_spans_forward(None, q, k, v, None, segments=segments)[0]
    assert len(calls) == 6
    with torch.enable_grad():
        trained = attention.packed_spans_forward(None, q.requires_grad_(), k, v, None, segments=segments)[0]
    assert torch.equal(no_grad, trained.detach())
    q.requires_grad_(False)
    calls.clear()
    _attention_grads(lambda q, k, v: attention.packed_spans_forward(None, q, k, v, None, segments=segments)[0],
                     q.float(), k.float(), v.float(), grad_out)
    _attention_grads(lambda q, k, v: attention.packed_spans_forward(None, q, k, v, None, dropout=0.1,
                                                                     segments=segments)[0], q, k, v, grad_out)
    assert not calls
