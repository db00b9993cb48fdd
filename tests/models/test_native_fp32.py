"""posttrain's fp32 CPU kernels for the AVX2 path (models/kernels/span_attention_fp32_avx2.cpp and
swiglu_fp32_avx2.cpp): accuracy against float64, against the PyTorch ops they replace, routing, switches and
fallbacks. They use AVX2 and FMA only, so they run (and are tested) on AVX2-only and AVX-512 CPUs alike."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from posttrain.models import attention, fused_mlp, native
from tests.models.test_native_attention import _grads, _segments_attention

needs_avx2 = pytest.mark.skipif(not native._cpu_has_avx2_fma() or shutil.which("g++") is None,
                                reason="needs a CPU with AVX2 and FMA, and g++")


def _inputs(batch, heads, kv_heads, length, dim, seed=0):
    """fp32 (B, H, T, D) views of (B, T, H, D) tensors, the layout transformers' attention hands over."""
    torch.manual_seed(seed)
    q = (torch.randn(batch, length, heads, dim) * 2).transpose(1, 2)  # logits up to ~+-15
    k = (torch.randn(batch, length, kv_heads, dim) * 2).transpose(1, 2)
    v = torch.randn(batch, length, kv_heads, dim).transpose(1, 2)
    return q, k, v, torch.randn(batch, length, heads, dim)


def _assert_as_accurate_as_sdpa(exact, sdpa, ours):
    """Max error of out, dQ, dK, dV against float64: within 2x fp32 SDPA's (the path replaced) and 1e-5 relative."""
    for name, e, s, o in zip(["out", "dq", "dk", "dv"], exact, sdpa, ours):
        scale = e.abs().max()
        err_sdpa, err_ours = (s - e).abs().max() / scale, (o - e).abs().max() / scale
        assert err_ours <= 2 * err_sdpa + 1e-6 and err_ours < 1e-5, f"{name}: {err_ours:.2e} vs sdpa {err_sdpa:.2e}"


CASES = [  # heads, kv heads, head dim, length, spans per row (1 token; partial micro-kernels; several blocks)
    (9, 3, 64, 100, [[(0, 37), (37, 100)], [(0, 100)]]),
    (4, 4, 32, 300, [[(0, 1), (1, 300)]]),
    (6, 2, 64, 77, [[(0, 77)], [(0, 5), (5, 70), (70, 77)], [(0, 33), (33, 77)]]),
    (2, 1, 128, 70, [[(0, 64), (64, 65), (65, 70)]]),
    (4, 2, 16, 50, [[(0, 17), (17, 50)]]),  # the tiny test models' head dimension
]


@needs_avx2
@pytest.mark.parametrize("heads,kv_heads,dim,length,segments", CASES)
def test_fp32_kernel_is_as_accurate_as_sdpa(heads, kv_heads, dim, length, segments, monkeypatch):
    """Output and dQ, dK, dV of packed causal spans against float64 SDPA per span: within 2x the error of
    PyTorch's fp32 SDPA per span (the path it replaces), and within 1e-5 relative; one call per layer."""
    assert native.span_attention_fp32_library() is not None, native.unavailable_reasons
    q, k, v, grad_out = _inputs(len(segments), heads, kv_heads, length, dim)
    calls = []
    original = attention._NativeSpanAttention.apply
    monkeypatch.setattr(attention._NativeSpanAttention, "apply", lambda *a: calls.append(1) or original(*a))
    ours = _grads(_segments_attention(segments), q, k, v, grad_out)
    assert calls == [1]
    exact = _grads(_segments_attention(segments), q.double(), k.double(), v.double(), grad_out)
    monkeypatch.setenv("POSTTRAIN_CPU_ATTENTION", "sdpa")
    sdpa = _grads(_segments_attention(segments), q, k, v, grad_out)
    assert calls == [1]
    _assert_as_accurate_as_sdpa(exact, sdpa, ours)


@needs_avx2
def test_fp32_kernel_custom_scale_no_grad_and_thread_count():
    """A non-default scale on (B, H, T, D)-contiguous inputs; no-grad passes take the kernel and equal the
    training forward bit for bit; 1 and 2 threads give bit-identical results (one task per thread)."""
    segments = [[(0, 150), (150, 200)], [(0, 60), (60, 200)]]
    q, k, v, grad_out = _inputs(2, 6, 3, 200, 64, seed=5)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    ours = _grads(_segments_attention(segments, 0.05), q, k, v, grad_out)

    def exact_attend(q, k, v):
        rows = [torch.cat([F.scaled_dot_product_attention(q[r:r + 1, :, s:e], k[r:r + 1, :, s:e], v[r:r + 1, :, s:e],
                                                         is_causal=True, scale=0.05, enable_gqa=True)
                           for s, e in spans], dim=2) for r, spans in enumerate(segments)]
        return torch.cat(rows).transpose(1, 2)

    exact = _grads(exact_attend, q.double(), k.double(), v.double(), grad_out)
    for name, e, o in zip(["out", "dq", "dk", "dv"], exact, ours):
        assert (o - e).abs().max() / e.abs().max() < 1e-5, name
    with torch.no_grad():
        assert torch.equal(_segments_attention(segments, 0.05)(q, k, v).double(), ours[0])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _grads(_segments_attention(segments), q, k, v, grad_out)
        torch.set_num_threads(2)
        two = _grads(_segments_attention(segments), q, k, v, grad_out)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


# RL groups (data.groups): a prompt's rows are a plain span, then each completion is a span that sees them in full.
PREFIX_CASES = [  # heads, kv heads, head dim, length, spans per row
    # two groups in a row: 4 completions (one of 1 token) of a 20-token prompt, 2 of a 9-token one, then padding
    (9, 3, 64, 180, [[(0, 20), (20, 45, 0, 20), (45, 80, 0, 20), (80, 81, 0, 20), (81, 90),
                      (90, 130, 81, 90), (130, 170, 81, 90), (170, 180)]]),
    # a prompt longer than a block, completions of several blocks; a second row whose prompt has one token (no prefix)
    (4, 2, 16, 150, [[(0, 40), (40, 110, 0, 40), (110, 113, 0, 40), (113, 150, 0, 40)],
                     [(0, 1), (1, 70, 0, 0), (70, 150, 0, 0)]]),
]


def _grouped_attention(segments):
    return lambda q, k, v: attention._segments(q, k, v, segments, 0.0, None)[0]


@needs_avx2
@pytest.mark.parametrize("heads,kv_heads,dim,length,segments", PREFIX_CASES)
def test_fp32_kernel_serves_shared_prompts(heads, kv_heads, dim, length, segments, monkeypatch):
    """Spans that see a shared prefix (RL's shared prompts): one kernel call per layer; output and dQ, dK, dV
    against float64 SDPA with the prefix mask per span (the path it replaces), the prompt rows' dK, dV summed over
    every completion of the group; as accurate as fp32 SDPA; no-grad equal; the same on 1 and 2 threads."""
    q, k, v, grad_out = _inputs(len(segments), heads, kv_heads, length, dim, seed=3)
    calls = []
    original = attention._NativeSpanAttention.apply
    monkeypatch.setattr(attention._NativeSpanAttention, "apply", lambda *a: calls.append(1) or original(*a))
    ours = _grads(_grouped_attention(segments), q, k, v, grad_out)
    assert calls == [1]
    exact = _grads(_grouped_attention(segments), q.double(), k.double(), v.double(), grad_out)
    with torch.no_grad():
        assert torch.equal(_grouped_attention(segments)(q, k, v).double(), ours[0])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _grads(_grouped_attention(segments), q, k, v, grad_out)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, ours))
    monkeypatch.setenv("POSTTRAIN_CPU_ATTENTION", "sdpa")
    sdpa = _grads(_grouped_attention(segments), q, k, v, grad_out)
    assert len(calls) == 3  # training, no-grad, one thread; the float64 and SDPA passes did not take the kernel
    _assert_as_accurate_as_sdpa(exact, sdpa, ours)
    prompt_dk = exact[2][0, :, :20]
    alone = _grads(_grouped_attention([[(0, 20)]]), q[:1, :, :20].double(), k[:1, :, :20].double(),
                   v[:1, :, :20].double(), grad_out[:1, :20])[2][0]
    assert (prompt_dk - alone).abs().max() > 0.1 * alone.abs().max()  # the completions' share is really there


def test_prefixes_the_kernel_cannot_serve_take_sdpa(monkeypatch):
    """A prefix that is not a span of its own row, or rows the spans do not cover, go to SDPA with the prefix
    mask."""
    assert attention._covers([[(0, 5), (5, 9, 0, 5)]], 9, prefixes=True)
    assert not attention._covers([[(0, 5), (5, 9, 0, 5)]], 9, prefixes=False)
    assert not attention._covers([[(0, 9), (9, 12, 0, 5)]], 12, prefixes=True)  # (0, 5) is not a span
    assert not attention._covers([[(0, 5), (5, 9, 0, 5)]], 10, prefixes=True)  # row not covered
    calls = []
    monkeypatch.setattr(attention._NativeSpanAttention, "apply", lambda *a: calls.append(1))
    q, k, v, _ = _inputs(1, 4, 2, 12, 16)
    attention._segments(q, k, v, [[(0, 9), (9, 12, 0, 5)]], 0.0, None)
    attention._segments(q, k, v, [[(0, 5), (5, 11, 0, 5)]], 0.0, None)  # position 11 in no span
    assert calls == []


def test_fp32_kernel_switches_and_unsupported_shapes(monkeypatch):
    """POSTTRAIN_CPU_ATTENTION=sdpa|products, POSTTRAIN_CPU_KERNELS=0, a CPU without AVX2, and a head dimension
    that is not a multiple of 16 all keep PyTorch's SDPA, with the same results."""
    calls = []
    monkeypatch.setattr(attention._NativeSpanAttention, "apply", lambda *a: calls.append(1))
    q, k, v, grad_out = _inputs(1, 4, 2, 20, 24)
    assert _grads(_segments_attention([[(0, 20)]]), q, k, v, grad_out)[0].shape == (1, 20, 4, 24)
    q, k, v, grad_out = _inputs(1, 4, 2, 20, 32)
    for var, value in (("POSTTRAIN_CPU_ATTENTION", "sdpa"), ("POSTTRAIN_CPU_ATTENTION", "products"),
                       ("POSTTRAIN_CPU_KERNELS", "0")):
        monkeypatch.setenv(var, value)
        _grads(_segments_attention([[(0, 20)]]), q, k, v, grad_out)
        assert native.span_attention_fp32_library() is None and value in native.unavailable_reasons[native.SPAN_FP32.name]
        monkeypatch.delenv(var)
    monkeypatch.setattr(native, "_cpu_has_avx2_fma", lambda: False)
    native._load.cache_clear()
    try:
        assert native.span_attention_fp32_library() is None and native.swiglu_library() is None
        assert "AVX2" in native.unavailable_reasons[native.SPAN_FP32.name]
        _grads(_segments_attention([[(0, 20)]]), q, k, v, grad_out)
    finally:
        native._load.cache_clear()
    assert calls == []


def test_failed_fp32_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_cpu_has_avx2_fma", lambda: True)
    monkeypatch.setenv("CXX", shutil.which("false") or "/bin/false")
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    native._load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="build failed"):
            assert native.swiglu_library() is None
        assert native.swiglu_library() is None  # cached: no second build, no second warning
        gate, up = torch.randn(4, 8), torch.randn(4, 8)
        assert torch.equal(fused_mlp.swiglu(gate, up), F.silu(gate) * up)
    finally:
        native._load.cache_clear()


@needs_avx2
def test_swiglu_kernel_against_float64_and_pytorch():
    """The forward is PyTorch's own (bit-identical); both gradients within a few fp32 ulp of float64, as PyTorch's
    are, over gates from -100 to 100 (far negative: sigmoid underflows; the kernel flushes subnormals) and an odd
    size (the scalar tail)."""
    assert native.swiglu_library() is not None, native.unavailable_reasons
    torch.manual_seed(0)
    gate = torch.cat([torch.randn(3001) * 4, torch.linspace(-100, 100, 999)]).reshape(8, 500)
    up, grad = torch.randn(8, 500), torch.randn(8, 500)
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out = fused_mlp.swiglu(g, u)
    out.backward(grad)
    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    ref = F.silu(g64) * u64
    ref.backward(grad.double())
    gt, ut = gate.clone().requires_grad_(), up.clone().requires_grad_()
    torch_out = F.silu(gt) * ut  # PyTorch's fp32 ops, the path the kernel replaces
    torch_out.backward(grad)
    for name, ours, eager, exact in (("out", out, torch_out, ref), ("dg", g.grad, gt.grad, g64.grad),
                                     ("du", u.grad, ut.grad, u64.grad)):
        err_ours, err_eager = ((t.detach().double() - exact).abs() for t in (ours, eager))
        # relative where the value is not tiny next to the tensor's scale (dsilu crosses zero near g = -1.28)
        assert (err_ours / (exact.abs() + 1e-3 * exact.abs().max())).max() < 5e-6, name
        assert err_ours.max() <= 4 * err_eager.max() + 1e-12, f"{name}: {err_ours.max():.2e} vs {err_eager.max():.2e}"
    assert torch.equal(out, torch_out)


@needs_avx2
def test_llama_form_mlps_are_routed_and_train_like_eager(tiny_model_dir, monkeypatch):
    """A Llama MLP goes through the fused node (which keeps g and u, not silu(g)); the loss equals the eager
    MLP's bit for bit (same forward ops) and gradients within fp32 rounding; Gemma's GELU MLP and Phi-3's fused
    gate-up MLP are not routed."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    eager_loss, eager_grads = loss_and_grads()
    assert fused_mlp.enable(model) == model.config.num_hidden_layers
    calls = []
    original = fused_mlp._SwiGLU.apply
    monkeypatch.setattr(fused_mlp._SwiGLU, "apply", lambda *a: calls.append(1) or original(*a))
    fused_loss, fused_grads = loss_and_grads()
    assert len(calls) == model.config.num_hidden_layers
    assert torch.equal(fused_loss, eager_loss)
    for a, b in zip(fused_grads, eager_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item())
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    phi3 = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0))
    assert fused_mlp.enable(gemma) == 0 and fused_mlp.enable(phi3) == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 under autocast: the module's own ops
        calls.clear()
        model(input_ids=ids)
        assert calls == []
