"""posttrain's AVX512-BF16 span-attention kernel (models/kernels/span_attention_avx512bf16.cpp) against float64,
against the PyTorch matrix-product path it replaces, and its build/fallback behaviour."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from posttrain.models import attention, native

needs_kernel = pytest.mark.skipif(not native._cpu_has_avx512_bf16() or shutil.which("g++") is None,
                                  reason="needs a CPU with AVX512-BF16 and g++")


def _grads(attend, q, k, v, grad_out):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = attend(q, k, v)
    out.backward(grad_out.to(out.dtype))
    return [out.detach().double()] + [t.grad.double() for t in (q, k, v)]


def _inputs(batch, heads, kv_heads, length, dim, seed=0):
    """(B, H, T, D) views of (B, T, H, D) tensors, the layout transformers' attention hands over."""
    torch.manual_seed(seed)
    q = (torch.randn(batch, length, heads, dim) * 2).bfloat16().transpose(1, 2)  # logits up to ~+-15
    k = (torch.randn(batch, length, kv_heads, dim) * 2).bfloat16().transpose(1, 2)
    v = torch.randn(batch, length, kv_heads, dim).bfloat16().transpose(1, 2)
    grad_out = torch.randn(batch, length, heads, dim).bfloat16()
    return q, k, v, grad_out


def _segments_attention(segments, scaling=None):
    return lambda q, k, v: attention._split_segments(q, k, v, segments, 0.0, scaling)[0]


CASES = [  # heads, kv heads, head dim, length, spans per row (1 token; a partial micro-kernel; several blocks)
    (9, 3, 64, 100, [[(0, 37), (37, 100)], [(0, 100)]]),
    (4, 4, 32, 300, [[(0, 1), (1, 300)]]),
    (6, 2, 64, 77, [[(0, 77)], [(0, 5), (5, 70), (70, 77)], [(0, 33), (33, 77)]]),
    (2, 1, 128, 70, [[(0, 64), (64, 65), (65, 70)]]),
]


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,dim,length,segments", CASES)
def test_kernel_is_as_accurate_as_the_products_it_replaces(heads, kv_heads, dim, length, segments, monkeypatch):
    """Output and dQ, dK, dV of packed causal spans against float64 SDPA per span: within 1.25x the error of the
    PyTorch matrix-product path (bf16 rounding of the results dominates both), plus a quarter of a bf16 ulp."""
    assert native.span_attention_library() is not None, native.unavailable_reason
    q, k, v, grad_out = _inputs(len(segments), heads, kv_heads, length, dim)
    calls = []
    original = attention._NativeSpanAttention.apply
    monkeypatch.setattr(attention._NativeSpanAttention, "apply", lambda *a: calls.append(1) or original(*a))
    ours = _grads(_segments_attention(segments), q, k, v, grad_out)
    assert calls == [1]  # one kernel call for the whole layer
    exact = _grads(_segments_attention(segments), q.double(), k.double(), v.double(), grad_out)
    monkeypatch.setenv("POSTTRAIN_CPU_ATTENTION", "products")
    products = _grads(_segments_attention(segments), q, k, v, grad_out)
    assert calls == [1]
    for name, e, p, o in zip(["out", "dq", "dk", "dv"], exact, products, ours):
        scale = e.abs().max()
        err_products, err_ours = (p - e).abs().max() / scale, (o - e).abs().max() / scale
        assert err_ours <= 1.25 * err_products + 2e-3, f"{name}: {err_ours:.2e} vs products {err_products:.2e}"
        assert (o - e).abs().mean() <= 1.1 * (p - e).abs().mean() + 1e-6, name


BF16_PREFIX_CASES = [  # RL groups (data.groups): a prompt's rows are a span, then completions that see them in full
    (9, 3, 64, 180, [[(0, 20), (20, 45, 0, 20), (45, 80, 0, 20), (80, 81, 0, 20), (81, 90),
                      (90, 130, 81, 90), (130, 170, 81, 90), (170, 180)]]),
    (4, 2, 32, 150, [[(0, 40), (40, 110, 0, 40), (110, 113, 0, 40), (113, 150, 0, 40)],
                     [(0, 1), (1, 70, 0, 0), (70, 150, 0, 0)]]),
]


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,dim,length,segments", BF16_PREFIX_CASES)
def test_kernel_serves_shared_prompts(heads, kv_heads, dim, length, segments, monkeypatch):
    """Spans that see a shared prefix: one kernel call per layer; output and dQ, dK, dV (the prompt rows' summed over
    the group) against float64 as accurate as the bf16 SDPA with a prefix mask per span it replaces; no-grad equal;
    the same on 1 and 2 threads."""
    def grouped(q, k, v):
        return attention._segments(q, k, v, segments, 0.0, None)[0]

    q, k, v, grad_out = _inputs(len(segments), heads, kv_heads, length, dim, seed=4)
    calls = []
    original = attention._NativeSpanAttention.apply
    monkeypatch.setattr(attention._NativeSpanAttention, "apply", lambda *a: calls.append(1) or original(*a))
    ours = _grads(grouped, q, k, v, grad_out)
    assert calls == [1]
    with torch.no_grad():
        assert torch.equal(grouped(q, k, v).double(), ours[0])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert all(torch.equal(a, b) for a, b in zip(_grads(grouped, q, k, v, grad_out), ours))
    finally:
        torch.set_num_threads(threads)
    exact = _grads(grouped, q.double(), k.double(), v.double(), grad_out)
    monkeypatch.setenv("POSTTRAIN_CPU_ATTENTION", "sdpa")
    sdpa = _grads(grouped, q, k, v, grad_out)
    assert len(calls) == 3
    for name, e, p, o in zip(["out", "dq", "dk", "dv"], exact, sdpa, ours):
        scale = e.abs().max()
        err_sdpa, err_ours = (p - e).abs().max() / scale, (o - e).abs().max() / scale
        assert err_ours <= 1.25 * err_sdpa + 2e-3, f"{name}: {err_ours:.2e} vs sdpa {err_sdpa:.2e}"
        # the kernel rounds P to bf16 for P v (as the products path does); SDPA's flash kernel keeps it in fp32
        assert (o - e).abs().mean() <= 1.5 * (p - e).abs().mean() + 1e-6, name


@needs_kernel
def test_kernel_takes_a_custom_scale_and_contiguous_inputs():
    """A non-default softmax scale, and (B, H, T, D)-contiguous inputs (other strides than transformers')."""
    segments = [[(0, 40), (40, 90)]]
    q, k, v, grad_out = _inputs(1, 4, 2, 90, 64, seed=3)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    ours = _grads(_segments_attention(segments, 0.05), q, k, v, grad_out)

    def exact_attend(q, k, v):
        parts = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, scale=0.05,
                                                enable_gqa=True) for s, e in segments[0]]
        return torch.cat(parts, dim=2).transpose(1, 2)

    exact = _grads(exact_attend, q.double(), k.double(), v.double(), grad_out)
    for name, e, o in zip(["out", "dq", "dk", "dv"], exact, ours):
        assert (o - e).abs().max() / e.abs().max() < 1.5e-2, name


@needs_kernel
def test_kernel_results_do_not_depend_on_thread_count():
    """Each (span, K/V head) task runs on one thread, so 1 and 2 threads give bit-identical results."""
    segments = [[(0, 150), (150, 200)], [(0, 60), (60, 200)]]
    q, k, v, grad_out = _inputs(2, 6, 3, 200, 64, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _grads(_segments_attention(segments), q, k, v, grad_out)
        torch.set_num_threads(2)
        two = _grads(_segments_attention(segments), q, k, v, grad_out)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_head_dims_the_kernel_cannot_take_use_the_products(monkeypatch):
    """A head dimension that is not a multiple of 32 (the tiny test models' 16) keeps the PyTorch products."""
    calls = []
    monkeypatch.setattr(attention._NativeSpanAttention, "apply", lambda *a: calls.append(1))
    q, k, v, grad_out = _inputs(1, 4, 2, 20, 16)
    out = _grads(_segments_attention([[(0, 20)]]), q, k, v, grad_out)
    assert calls == [] and out[0].shape == (1, 20, 4, 16)


def test_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    """A compiler that fails: one warning naming the reason, no kernel, and attention still runs (products)."""
    monkeypatch.setattr(native, "_cpu_has_avx512_bf16", lambda: True)
    monkeypatch.setenv("CXX", shutil.which("false") or "/bin/false")
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    monkeypatch.delenv("POSTTRAIN_CPU_ATTENTION", raising=False)
    native._load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="build failed"):
            assert native.span_attention_library() is None
        assert native.span_attention_library() is None  # cached: no second build, no second warning
        assert "failed" in native.unavailable_reason
        q, k, v, grad_out = _inputs(1, 2, 1, 10, 32)
        assert _grads(_segments_attention([[(0, 10)]]), q, k, v, grad_out)[0].shape == (1, 10, 2, 32)
    finally:
        native._load.cache_clear()


def test_switch_and_missing_cpu_feature_skip_the_kernel(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CPU_ATTENTION", "products")
    assert native.span_attention_library() is None and "products" in native.unavailable_reason
    monkeypatch.delenv("POSTTRAIN_CPU_ATTENTION")
    monkeypatch.setattr(native, "_cpu_has_avx512_bf16", lambda: False)
    native._load.cache_clear()
    try:
        assert native.span_attention_library() is None and "AVX512-BF16" in native.unavailable_reason
    finally:
        native._load.cache_clear()


def test_span_table_lists_every_span_longest_first():
    table = attention.span_table([[(0, 3), (3, 10)], [(0, 10)]])
    assert table.dtype == torch.int32
    assert table.tolist() == [[1, 0, 10, 0, 0], [0, 3, 10, 0, 0], [0, 0, 3, 0, 0]]
    # a shared prefix's keys count as work: a 4-token span seeing a 5-token prefix (4 x 14) before a 7-token span
    table = attention.span_table([[(0, 5), (5, 9, 0, 5), (9, 16, 0, 0)]])
    assert table.tolist() == [[0, 5, 9, 0, 5], [0, 9, 16, 0, 0], [0, 0, 5, 0, 0]]


@needs_kernel
def test_no_grad_passes_use_the_kernel_too(monkeypatch):
    """Eval and reference-model passes (no gradients) run the same kernel: bit-identical to the training forward."""
    segments = [[(0, 30), (30, 64)]]
    q, k, v, _ = _inputs(1, 6, 2, 64, 64, seed=7)
    calls = []
    original = attention._NativeSpanAttention.apply
    monkeypatch.setattr(attention._NativeSpanAttention, "apply", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        no_grad = _segments_attention(segments)(q, k, v)
    training = _segments_attention(segments)(*(t.detach().requires_grad_() for t in (q, k, v)))
    assert calls == [1, 1] and not no_grad.requires_grad
    assert torch.equal(no_grad, training.detach())


def test_autocast_casts_fp32_inputs_like_sdpa_would(monkeypatch):
    """A full fine-tune reaches attention with fp32 q, k, v under bf16 autocast (rotary's fp32 cos/sin). They
    are cast to bf16 up front, as SDPA would cast them, so the bf16 span kernels serve full FT too: the output
    equals feeding the bf16 casts directly, and the gradients reach the fp32 inputs in fp32."""
    segments = [[(0, 25), (25, 40)]]
    torch.manual_seed(11)
    q, k, v = torch.randn(1, 6, 40, 64), torch.randn(1, 2, 40, 64), torch.randn(1, 2, 40, 64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention.packed_spans_forward(None, *leaves, None, segments=segments)[0]
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and all(t.grad.dtype == torch.float32 for t in leaves)
    direct = attention.packed_spans_forward(None, *(t.bfloat16().requires_grad_() for t in (q, k, v)), None,
                                             segments=segments)[0]
    assert torch.equal(out, direct)
    with torch.no_grad():  # without autocast fp32 stays fp32
        assert attention.packed_spans_forward(None, q, k, v, None, segments=segments)[0].dtype == torch.float32
