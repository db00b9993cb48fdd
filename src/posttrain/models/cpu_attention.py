"""posttrain's CPU bf16 attention for packed spans, used by :mod:`posttrain.models.attention` when the spans tile
the rows: ONE call per layer of the C++ kernel (:class:`_NativeSpanAttention`, AVX512-BF16, :mod:`posttrain.models.native`),
or causal blocks of PyTorch matrix products (:class:`_CausalSpanAttention`), fp32 where the softmax needs it and bf16
elsewhere, with or without gradients."""

from __future__ import annotations

import torch

from posttrain.models import native

_above: torch.Tensor | None = None  # one "above the diagonal" mask, sliced for every shorter span


def _above_diagonal(length: int) -> torch.Tensor:
    """The (L, L) mask of the keys a causal query must not see: a view of one mask as long as the longest span
    so far (a mask per length would hold sum L^2 bytes)."""
    global _above
    if _above is None or _above.shape[0] < length:
        _above = torch.ones(length, length, dtype=torch.bool).triu_(1)
    return _above[:length, :length]


class _CausalSpanAttention(torch.autograd.Function):
    """Causal attention of one packed sequence on a CPU in bf16, forward and backward from matrix products.

    PyTorch's CPU flash-attention kernel ran at ~60 GFLOP/s on the 200-300-token spans of packed chat data on
    a CPU with AVX512-BF16, where a bf16 matmul runs at ~900: 2.3 s of a 6.6 s LoRA step of SmolLM2-135M
    (its backward alone 1.7 s). Here the products that tolerate bf16 inputs are bf16 matmuls, and the ones
    whose rounding the softmax would amplify are fp32:

        P  = softmax((q k^T) s), causal    scores from fp32 copies of q and k (never rounded to bf16), fp32 P
        out = bf16(P) v                    bf16 matmul
        backward: P recomputed the same way (nothing L x L is kept), dV = bf16(P)^T dO, dP = dO v^T in fp32,
                  dS = P (dP - rowsum(dO * out)) s, dQ = bf16(dS) k, dK = bf16(dS)^T q

    Grouped-query heads: the ``g = H / H_kv`` query heads of one K/V head are stacked into one (g n x d)
    matrix, so K and V are never repeated and dK, dV come out summed over the group. Causal blocks: query rows
    [start, start + 128) are multiplied only by the keys [0, start + 128) they can see (a 300-token span does
    69% of the L^2 products). Kept for backward: q, k, v and the output.

    Why this over the flash kernel, and 128-row blocks: docs/benchmarks.md, "Measurements behind the code". Errors against float64 are of
    the flash kernel's size (gradients within 2x of its, tested in tests/data/test_packing_and_lean_loss.py).
    """

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        heads, length, dim = q.shape
        kv_heads = k.shape[0]
        group = heads // kv_heads
        q4 = q.reshape(kv_heads, group, length, dim)  # query heads h*g .. h*g+g-1 share K/V head h
        out = torch.empty(kv_heads, group, length, dim, dtype=q.dtype, device=q.device)
        with torch.autocast(q.device.type, enabled=False):  # the fp32 products must stay fp32
            keys32 = k.float()  # once per span, not once per block
            for start, end in _row_blocks(length):
                probs = _block_probs(q4[:, :, start:end], keys32[:, :end], start, scale)
                out[:, :, start:end] = torch.bmm(probs.to(q.dtype), v[:, :end]).view(kv_heads, group, end - start, dim)
        out = out.view(heads, length, dim)
        ctx.save_for_backward(q, k, v, out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out = ctx.saved_tensors
        heads, length, dim = q.shape
        kv_heads = k.shape[0]
        group = heads // kv_heads
        q4, grad4 = q.reshape(kv_heads, group, length, dim), grad_out.reshape(kv_heads, group, length, dim)
        delta4 = torch.linalg.vecdot(grad4.float(), out.reshape(kv_heads, group, length, dim).float())
        keys32, values32 = k.float(), v.float()
        if length <= BLOCK_ROWS:
            grad_q, grad_k, grad_v = _block_backward(q4, grad4, delta4, k, keys32, values32, 0, ctx.scale)
            return grad_q.view(heads, length, dim), grad_k, grad_v, None
        grad_q = torch.empty(kv_heads, group, length, dim, dtype=q.dtype, device=q.device)
        grad_k = torch.zeros(kv_heads, length, dim, dtype=torch.float32, device=q.device)
        grad_v = torch.zeros_like(grad_k)
        for start, end in _row_blocks(length):
            dq, dk, dv = _block_backward(q4[:, :, start:end], grad4[:, :, start:end], delta4[:, :, start:end],
                                         k[:, :end], keys32[:, :end], values32[:, :end], start, ctx.scale)
            grad_q[:, :, start:end] = dq
            grad_k[:, :end] += dk
            grad_v[:, :end] += dv
        return grad_q.view(heads, length, dim), grad_k.to(k.dtype), grad_v.to(v.dtype), None


BLOCK_ROWS = 128  # query rows per causal block of _CausalSpanAttention


def _row_blocks(length: int) -> list[tuple[int, int]]:
    return [(start, min(start + BLOCK_ROWS, length)) for start in range(0, length, BLOCK_ROWS)]


def _block_probs(q4: torch.Tensor, keys32: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """softmax over the visible keys for query rows [start, start + n): q4 (H_kv, g, n, d) bf16, keys32
    (H_kv, start + n, d) fp32 -> (H_kv, g n, start + n) fp32."""
    kv_heads, group, rows, dim = q4.shape
    keys = keys32.shape[1]
    scores = _fp32_products(q4.reshape(kv_heads, group * rows, dim), keys32)
    scores.view(kv_heads, group, rows, keys).masked_fill_(_above_diagonal(keys)[start:keys], float("-inf"))
    return torch.softmax(scores.mul_(scale), dim=-1)


def _block_backward(q4, grad4, delta4, k, keys32, values32, start: int, scale: float):
    """Gradients from query rows [start, start + n) of a span, whose visible keys are k[:, :start + n] (bf16, and
    keys32/values32 the fp32 copies of k and v). q4, grad4 (H_kv, g, n, d) bf16, delta4 (H_kv, g, n) fp32 =
    rowsum(dO * out). Returns dQ (H_kv, g, n, d), and this block's parts of dK, dV (H_kv, start + n, d)."""
    kv_heads, group, rows, dim = q4.shape
    grouped = q4.reshape(kv_heads, group * rows, dim)
    grad_grouped = grad4.reshape(kv_heads, group * rows, dim)
    probs = _block_probs(q4, keys32, start, scale)
    grad_v = torch.bmm(probs.to(q4.dtype).transpose(1, 2), grad_grouped)
    grad_probs = _fp32_products(grad_grouped, values32)
    grad_scores = grad_probs.sub_(delta4.reshape(kv_heads, group * rows, 1)).mul_(probs).mul_(scale).to(q4.dtype)
    del probs, grad_probs
    grad_q = torch.bmm(grad_scores, k).view(kv_heads, group, rows, dim)
    grad_k = torch.bmm(grad_scores.transpose(1, 2), grouped)
    return grad_q, grad_k, grad_v


def _fp32_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(G, M, d) x (G, N, d) bf16 or fp32 -> a b^T (G, M, N) in fp32, one 2-D matmul per group (torch's fp32 ``bmm``
    ran at about half the 2-D ``mm`` speed on these shapes)."""
    a32, b32 = a.float(), b.float()
    out = torch.empty(a.shape[0], a.shape[1], b.shape[1], dtype=torch.float32, device=a.device)
    for g in range(a.shape[0]):
        torch.mm(a32[g], b32[g].T, out=out[g])
    return out


def span_table(segments) -> torch.Tensor:
    """(n, 5) int32 rows of (batch row, start, end, prefix start, prefix end; the prefix empty for a plain span),
    the most keys first (the kernel's threads take tasks in this order, so the long ones do not come last)."""
    spans = []
    for row, row_spans in enumerate(segments):
        for span in row_spans:
            ps, pe = (span[2], span[3]) if len(span) == 4 and span[3] > span[2] else (0, 0)
            spans.append((row, span[0], span[1], ps, pe))
    spans.sort(key=lambda s: -(s[2] - s[1]) * (s[2] - s[1] + 2 * (s[4] - s[3])))  # len^2 + 2 len prefix: the work
    return torch.tensor(spans, dtype=torch.int32).reshape(-1, 5)


def _head_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def native_library(dtype: torch.dtype):
    """posttrain's C++ span-attention kernel for ``dtype``: the AVX512-BF16 one for bf16, the AVX2/FMA one for
    fp32; None when it is not available (see :mod:`posttrain.models.native`)."""
    if dtype == torch.bfloat16:
        return native.span_attention_library()
    if dtype == torch.float32:
        return native.span_attention_fp32_library()
    return None


class _NativeSpanAttention(torch.autograd.Function):
    """Causal attention of every packed span of a layer in one call of posttrain's C++ kernel
    (:mod:`posttrain.models.native`). bf16 (AVX512-BF16): the math of :class:`_CausalSpanAttention`, with the
    scores' products in fp32 at the bf16 rate (``vdpbf16ps``); fp32 (AVX2 and FMA): the same blocks in fp32.
    Softmax and masks are fused into the blocks, and there is no per-span Python.
    q (B, H, T, D), k and v (B, H_kv, T, D), any strides with D contiguous; returns (B, T, H, D) contiguous, the
    layout the output projection reads. Saves q, k, v, the output and each row's logsumexp (B H T floats)."""

    @staticmethod
    def forward(ctx, q, k, v, spans, scale: float):
        q, k, v = (_head_dim_contiguous(t) for t in (q, k, v))
        batch, heads, length, dim = q.shape
        out = torch.empty(batch, length, heads, dim, dtype=q.dtype)
        lse = torch.empty(batch, heads, length, dtype=torch.float32)
        library = native_library(q.dtype)
        status = library.posttrain_span_attention_forward(
            q.data_ptr(), native.strides(q), k.data_ptr(), native.strides(k), v.data_ptr(), native.strides(v),
            out.data_ptr(), native.strides(out.transpose(1, 2)), lse.data_ptr(), batch, heads, k.shape[1], length,
            dim, spans.data_ptr(), spans.shape[0], scale, torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"span attention kernel refused shapes q {tuple(q.shape)} k {tuple(k.shape)}")
        ctx.save_for_backward(q, k, v, out, lse, spans)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, spans = ctx.saved_tensors
        grad = _head_dim_contiguous(grad_out).transpose(1, 2)
        batch, heads, length, dim = q.shape
        kv_heads = k.shape[1]
        dq = torch.empty(batch, length, heads, dim, dtype=q.dtype).transpose(1, 2)
        dk = torch.empty(batch, length, kv_heads, dim, dtype=k.dtype).transpose(1, 2)
        dv = torch.empty(batch, length, kv_heads, dim, dtype=v.dtype).transpose(1, 2)
        library = native_library(q.dtype)
        status = library.posttrain_span_attention_backward(
            q.data_ptr(), native.strides(q), k.data_ptr(), native.strides(k), v.data_ptr(), native.strides(v),
            out.data_ptr(), native.strides(out.transpose(1, 2)), grad.data_ptr(), native.strides(grad),
            lse.data_ptr(), dq.data_ptr(), native.strides(dq), dk.data_ptr(), native.strides(dk), dv.data_ptr(),
            native.strides(dv), batch, heads, kv_heads, length, dim, spans.data_ptr(), spans.shape[0], ctx.scale,
            torch.get_num_threads())
        if status != 0:
            raise RuntimeError("span attention kernel refused the backward's shapes")
        return dq, dk, dv, None, None
