"""Attention for packed rows without flash-attention: causal SDPA per packed sequence (``packed_spans``).

A packed row holds several sequences. transformers' ``sdpa`` can isolate them only through a (B, 1, T, T)
block-diagonal mask, and with any mask PyTorch's SDPA leaves its fused kernels: it repeats the grouped K/V
heads and computes all T^2 scores, most of them masked. This implementation instead runs
``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` on each sequence's span of the row, so the
work is sum(len_i^2) and no mask exists, with identical loss (the speed-up over the masked version is measured
in docs/benchmarks.md).

A span may also name a shared prefix ``(start, end, prefix_start, prefix_end)``: its queries see the prefix in
full and themselves causally. RL uses it to run a prompt once for all completions of its group
(:mod:`posttrain.data.groups`).

On CUDA, in bf16/fp16, when the spans tile the rows (no shared prefix) and PyTorch has
``torch.nn.attention.varlen.varlen_attn`` (flash-attention's varlen kernel, built into PyTorch), the whole batch
runs as ONE varlen call per layer instead of one SDPA call per span: the rows are flattened to (B*T, H, D) and
the spans become cumulative sequence offsets. A small model on a GPU is launch-bound, and per-span calls were
most of a step (docs/benchmarks.md, H200). If the kernel raises, a warning is printed once and the per-span
path is used from then on; ``POSTTRAIN_VARLEN=0`` turns it off.

On a CPU in bf16, when the spans tile the rows: with AVX512-BF16, a compiler and a head dimension that is a
multiple of 32, the whole layer is ONE call of posttrain's C++ kernel, with or without gradients
(:class:`_NativeSpanAttention`, :mod:`posttrain.models.native`; faster than the products below, see docs/benchmarks.md).
Otherwise each span runs :class:`_CausalSpanAttention`: causal blocks of PyTorch matrix
products, fp32 where the softmax needs it and bf16 elsewhere, instead of the CPU flash kernel (faster on a LoRA
step, docs/benchmarks.md), with or without gradients. On a CPU in fp32 (the AVX2 path, where posttrain trains in
fp32) with AVX2, FMA, a compiler and a head dimension that is a multiple of 16, the layer is likewise ONE call of
posttrain's fp32 kernel (2.8x PyTorch's fp32 flash kernel per span on a layer's forward and backward); otherwise
causal SDPA per span. Both kernels also serve RL's shared prompts (each completion's span sees its prompt's rows,
whose key and value gradients the kernel sums over the group), which otherwise run SDPA with a prefix mask per
span.
``POSTTRAIN_CPU_ATTENTION=products`` skips the kernels, ``=sdpa`` the products too.
Generation with a KV cache never comes here (no ``segments``).

Families whose attention is not plain causal are exact too (:class:`LayerExtras`): the layer's
``sliding_window``, ``softcap`` (Gemma 2) and ``s_aux`` sinks (gpt-oss) arrive with each call. The fast paths
above serve a layer only when every span is plain for it (shorter than its window, no soft-cap, no sinks);
otherwise :func:`_exact_segments` runs each span in query-row blocks with the window mask, or as explicit
checkpointed products. Unpacked batches of such layers run :func:`exact_attention` with transformers' mask.

It is registered with transformers' ``AttentionInterface`` as ``packed_spans`` and used when
``attn_implementation`` resolves to it (``auto`` without flash-attn). Without a ``segments`` argument (unpacked
batches, generation, eval) it is exactly transformers' ``sdpa``. Spans come from the position ids, which restart
at 0 for every packed sequence; padding at a row's end continues the last sequence's positions, so it joins
that span, where causality keeps real tokens from ever attending to it (its labels are -100).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import native
from .cpu_attention import _CausalSpanAttention, _NativeSpanAttention, native_library, span_table  # noqa: F401

NAME = "packed_spans"
# The name this implementation had before: transformers reads any name containing "sdpa" as SDPA and refuses it
# for families SDPA cannot serve (Gemma 2, gpt-oss), so it was renamed; configs that say it still work.
OLD_NAME = "sdpa_segments"


def segments_from_positions(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """(B, T) position ids restarting at 0 per sequence -> per row, the [start, end) span of each sequence."""
    out = []
    for row in position_ids.tolist():
        starts = [i for i, p in enumerate(row) if p == 0] or [0]
        if starts[0] != 0:
            starts.insert(0, 0)
        out.append(list(zip(starts, starts[1:] + [len(row)])))
    return out


def packed_spans_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          segments: list[list[tuple[int, ...]]] | None = None, sliding_window: int | None = None,
                          softcap: float | None = None, s_aux: torch.Tensor | None = None, **kwargs):
    """query (B, H, T, D), key/value (B, H_kv, T, D) -> (B, T, H, D), like transformers' attention functions.

    ``sliding_window``, ``softcap`` and ``s_aux`` (attention sinks) are what the family's attention module passes
    for this layer (Mistral, Gemma 2/3, gpt-oss, ...); each is honoured exactly (see :class:`LayerExtras`)."""
    extras = LayerExtras(sliding_window or None, softcap or None, s_aux)
    if segments is None:
        if extras.softcap is None and extras.sinks is None:  # transformers' mask carries window and padding
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          **kwargs)
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        return exact_attention(query, key, value, attention_mask, scale, extras, dropout), None
    query, key, value = _autocast_inputs(query, key, value)
    if not extras.plain_for(_longest_visible(segments)):
        return _exact_segments(query, key, value, segments, dropout, scaling, extras), None
    if _varlen_applicable(query, dropout, segments):
        out = _varlen_segments(query, key, value, segments, scaling)
        if out is not None:
            return out
    with _without_cudnn(query.device):
        return _segments(query, key, value, segments, dropout, scaling)


@dataclass(frozen=True)
class LayerExtras:
    """What a layer's attention adds to plain causal softmax(q k^T s) v.

    - ``window``: a query at position i sees keys at positions j with i - j < window (transformers'
      ``sliding_window_overlay``); a sequence of at most ``window`` tokens is therefore plain causal.
    - ``softcap``: scores s -> softcap * tanh(s / softcap) before the mask (Gemma 2).
    - ``sinks``: (H,) learned logits that join every row's softmax and are dropped after it (gpt-oss).
    The fast kernels (varlen, the C++ span kernel, the bf16 products, causal SDPA) compute plain causal
    attention, so they serve a layer only when :meth:`plain_for` its longest span holds."""

    window: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None

    def plain_for(self, visible: int) -> bool:
        """Plain causal attention is exact for a query that sees at most ``visible`` keys."""
        return self.softcap is None and self.sinks is None and (self.window is None or visible <= self.window)


def _longest_visible(segments) -> int:
    """The most keys any query of the batch can see: a span's length plus its shared prefix."""
    return max(span[1] - span[0] + (span[3] - span[2] if len(span) == 4 else 0)
               for spans in segments for span in spans)


def exact_attention(query, key, value, allowed, scale: float, extras: LayerExtras, dropout: float = 0.0):
    """Attention with a boolean mask and a layer's extras, from explicit products: the math of the families'
    eager attention (scores scaled, soft-capped, masked; sinks joined to the softmax), computed in fp32.

    query (B, H, n, D), key/value (B, H_kv, m, D); ``allowed`` (B or 1, 1, n, m) boolean (True = attend), or
    None for causal attention aligned at the last key (what transformers' mask helpers mean by no mask).
    Returns (B, n, H, D) in the query's dtype. Grouped query heads are broadcast, never repeated."""
    with torch.autocast(query.device.type, enabled=False):  # the products stay fp32 under bf16 autocast
        return _exact_attention(query, key, value, allowed, scale, extras, dropout)


def _exact_attention(query, key, value, allowed, scale: float, extras: LayerExtras, dropout: float):
    batch, heads, rows, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group = heads // kv_heads
    compute = torch.promote_types(query.dtype, torch.float32)  # fp32, or fp64 for a float64 check
    q5 = query.to(compute).reshape(batch, kv_heads, group, rows, dim)  # head h uses K/V head h // group
    scores = torch.matmul(q5, key.to(compute)[:, :, None].transpose(-1, -2)).mul_(scale)  # (B, H_kv, g, n, m)
    if extras.softcap is not None:
        scores = torch.tanh(scores / extras.softcap) * extras.softcap
    if allowed is None:
        allowed = torch.ones(rows, keys, dtype=torch.bool, device=query.device).tril_(keys - rows)[None, None]
    elif allowed.dtype != torch.bool:  # an additive mask (eager's convention): 0 = attend
        allowed = allowed == 0
    # the mask fills with the dtype's minimum, as eager adds it: a row with no visible key gets uniform weights,
    # never NaN (such rows are padding, whose outputs no target reads)
    scores = scores.masked_fill(~allowed[:, :, None], torch.finfo(compute).min)
    if extras.sinks is not None:
        sinks = extras.sinks.to(compute).reshape(1, kv_heads, group, 1, 1).expand(batch, -1, -1, rows, 1)
        probs = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    if dropout:
        probs = F.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs.to(value.dtype), value[:, :, None])  # (B, H_kv, g, n, D)
    return out.reshape(batch, heads, rows, dim).transpose(1, 2).contiguous()


def block_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """(n, m) boolean from query and key positions in one sequence's coordinates: causal, within ``window``."""
    allowed = key_pos[None, :] <= query_pos[:, None]
    if window is not None:
        allowed &= query_pos[:, None] - key_pos[None, :] < window
    return allowed


EXACT_BLOCK_ROWS = 128  # query rows per block of a span that takes the window mask or the exact products


def _exact_segments(query, key, value, segments, dropout, scaling, extras: LayerExtras):
    """Per span: plain causal SDPA where the span fits the layer's plain case; else blocks of 128 query rows, each
    against only the keys it can see (causal: none after the block; a window: none more than ``window - 1``
    positions before its first row), through SDPA with the block's mask (windows alone) or
    :func:`exact_attention` (soft-capping, sinks). With gradients the products blocks are checkpointed: their
    fp32 score matrices are recomputed in backward, never kept, so memory stays that of the fast kernels
    (q, k, v and the output) and a gpt-oss 128-token window costs 128 keys per query, not the span."""
    gqa = query.shape[1] != key.shape[1]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    products = extras.softcap is not None or extras.sinks is not None
    recompute = products and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    rows = []
    for r, spans in enumerate(segments):
        parts = []
        for span in spans:
            s, e = span[0], span[1]
            ps, pe = (span[2], span[3]) if len(span) == 4 else (0, 0)
            q, k, v = query[r : r + 1, :, s:e], key[r : r + 1, :, s:e], value[r : r + 1, :, s:e]
            if pe > ps:  # the shared prefix's keys first: key c sits at position c of the span's coordinates
                k = torch.cat([key[r : r + 1, :, ps:pe], k], dim=2)
                v = torch.cat([value[r : r + 1, :, ps:pe], v], dim=2)
            n, prefix = e - s, pe - ps
            if extras.plain_for(n + prefix) and not prefix:
                parts.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                                            enable_gqa=gqa).transpose(1, 2))
                continue
            for a in range(0, n, EXACT_BLOCK_ROWS):
                b = min(a + EXACT_BLOCK_ROWS, n)
                hi = prefix + b
                lo = max(0, prefix + a - extras.window + 1) if extras.window is not None else 0
                allowed = block_mask(torch.arange(prefix + a, hi, device=q.device),
                                     torch.arange(lo, hi, device=q.device), extras.window)
                qb, kb, vb = q[:, :, a:b], k[:, :, lo:hi], v[:, :, lo:hi]
                if not products:
                    parts.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed, dropout_p=dropout,
                                                                scale=scaling, enable_gqa=gqa).transpose(1, 2))
                elif recompute:
                    parts.append(checkpoint(exact_attention, qb, kb, vb, allowed[None, None], scale, extras, dropout,
                                            use_reentrant=False))
                else:
                    parts.append(exact_attention(qb, kb, vb, allowed[None, None], scale, extras, dropout))
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0).contiguous()


def _autocast_inputs(query, key, value):
    """Under autocast, attention's inputs in the autocast dtype, as SDPA itself would take them. A full fine-tune
    (fp32 weights, bf16 autocast) reaches attention with fp32 q and k (rotary multiplies by fp32 cos/sin); cast
    here, the bf16 kernels above (varlen on CUDA, the span kernel on a CPU) serve it as they serve LoRA, where
    before the per-span SDPA calls cast each span themselves."""
    device = query.device.type
    if query.dtype != torch.float32 or not torch.is_autocast_enabled(device):
        return query, key, value
    dtype = torch.get_autocast_dtype(device)
    return query.to(dtype), key.to(dtype), value.to(dtype)


_varlen_failed: str | None = None  # the first error the varlen kernel raised; the per-span path is used after it


def _varlen_applicable(query: torch.Tensor, dropout: float, segments) -> bool:
    """One varlen call serves the batch: CUDA, half precision (flash kernels), no dropout (the kernel has none),
    spans that tile every row, not switched off, no earlier failure."""
    return (query.device.type == "cuda" and query.dtype in (torch.float16, torch.bfloat16) and not dropout
            and _varlen_failed is None and os.environ.get("POSTTRAIN_VARLEN", "1") != "0"
            and _tiles(segments, query.shape[2]))


def _varlen_kernel():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.9
        return None
    return varlen_attn


def cumulative_offsets(segments, length: int) -> tuple[list[int], int]:
    """Spans tiling B rows of ``length`` -> the flattened (B * length) sequence's start offsets plus its end, and
    the longest span."""
    offsets = [row * length + span[0] for row, spans in enumerate(segments) for span in spans]
    longest = max(span[1] - span[0] for spans in segments for span in spans)
    return offsets + [len(segments) * length], longest


@functools.lru_cache(maxsize=4)
def _parameters(kernel) -> frozenset[str]:
    """The kernel's keyword names, read once (not in every layer of every forward)."""
    return frozenset(inspect.signature(kernel).parameters)


_offsets_cache: tuple | None = None  # (segments, length, device, offsets tensor, longest) of the last batch


def _device_offsets(segments, length: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """The batch's int32 offsets on ``device``: one host-to-device copy per batch, shared by all its layers (every
    layer of a forward gets the same ``segments`` list)."""
    global _offsets_cache
    cached = _offsets_cache
    if cached is None or cached[0] is not segments or cached[1] != length or cached[2] != device:
        offsets, longest = cumulative_offsets(segments, length)
        cached = (segments, length, device, torch.tensor(offsets, dtype=torch.int32, device=device), longest)
        _offsets_cache = cached
    return cached[3], cached[4]


def _varlen_segments(query, key, value, segments, scaling):
    """query (B, H, T, D), key/value (B, H_kv, T, D) -> ((B, T, H, D), None) through one varlen kernel call, or
    None when the kernel is missing or failed."""
    global _varlen_failed
    kernel = _varlen_kernel()
    if kernel is None:
        return None
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)  # transformers' (B, T, H, D) storage: a view
    k = key.transpose(1, 2).reshape(batch * length, kv_heads, dim)
    v = value.transpose(1, 2).reshape(batch * length, kv_heads, dim)
    cu, longest = _device_offsets(segments, length, query.device)
    params = _parameters(kernel)
    kwargs = {}
    if "is_causal" in params:
        kwargs["is_causal"] = True
    elif "window_size" in params:  # torch 2.13: causal is the window (-1, 0)
        kwargs["window_size"] = (-1, 0)
    else:
        return _unusable(f"varlen_attn{_signature(kernel)} takes neither is_causal nor window_size")
    if "scale" in params:
        if scaling is not None:
            kwargs["scale"] = scaling
    elif scaling is not None and not math.isclose(scaling, dim**-0.5, rel_tol=1e-6):
        # early varlen_attn (torch 2.9-2.10) has no scale: it always uses 1/sqrt(head_dim), which is the
        # scaling transformers passes for Llama-form models, so only another scaling needs the per-span path
        return _unusable(f"varlen_attn{_signature(kernel)} has no scale and the model uses {scaling}")
    if heads != kv_heads:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # each K/V head serves heads // kv_heads consecutive query heads
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
    try:
        out = kernel(q, k, v, cu, cu, longest, longest, **kwargs)
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
        _varlen_failed = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"varlen attention failed ({_varlen_failed}); using per-sequence SDPA from now on",
                      RuntimeWarning, stacklevel=2)
        return None
    if isinstance(out, tuple):  # (output, logsumexp) from versions that return the auxiliary outputs
        out = out[0]
    return out.view(batch, length, heads, dim), None


def _unusable(reason: str):
    """This torch's kernel cannot serve the model: say so once, use the per-span path from now on."""
    global _varlen_failed
    _varlen_failed = reason
    warnings.warn(f"varlen attention not used ({reason}); using per-sequence SDPA", RuntimeWarning, stacklevel=3)
    return None


def _signature(kernel) -> str:
    return str(inspect.signature(kernel))


def _without_cudnn(device: torch.device):
    """Per-span SDPA on CUDA must not reach the cuDNN backend: it builds a graph per new sequence length, and
    packed spans have ever-new lengths. Measured on an H200 (torch 2.11, benchmarks/results/h200-2026-11-27):
    ~1.6 ms of CPU per cuDNN attention call against ~7 us of GPU work, 75% of a LoRA step's wall time.
    Flash/efficient/math stay allowed, in PyTorch's own order of preference."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _covers(segments, length: int, prefixes: bool) -> bool:
    """Every row's spans cover [0, length) in order; a shared prefix is allowed only with ``prefixes``, and then
    it must be a span of its own in the same row (as data.groups lays a group out)."""
    for spans in segments:
        end = 0
        own = {(span[0], span[1]) for span in spans}
        for span in spans:
            if span[0] != end:
                return False
            if len(span) == 4 and span[3] > span[2] and not (prefixes and (span[2], span[3]) in own):
                return False
            end = span[1]
        if end != length:
            return False
    return True


def _tiles(segments, length: int) -> bool:
    """Every row's spans are plain (no shared prefix) and cover [0, length) in order."""
    return _covers(segments, length, prefixes=False)


def _cpu_bf16_grouped(query, key, dropout: float) -> bool:
    """What both CPU span paths below need: bf16 on a CPU, no dropout, heads a multiple of the K/V heads."""
    return (query.device.type == "cpu" and query.dtype == torch.bfloat16 and not dropout
            and query.shape[1] % key.shape[1] == 0)


def _own_kernel_applies(query, key, value, dropout: float) -> bool:
    """The bf16 CPU case :class:`_CausalSpanAttention` serves, with or without gradients: no dropout, heads a
    multiple of the K/V heads, not switched off with ``POSTTRAIN_CPU_ATTENTION=sdpa``. No-grad passes (a
    reference model's, eval's) take it too, so that a policy and its reference compute bit-identical
    log-probs where their weights agree (DPO's first loss is ln 2 in bf16 as in fp32); its forward is also
    faster than the CPU flash kernel's (docs/benchmarks.md)."""
    return _cpu_bf16_grouped(query, key, dropout) and os.environ.get("POSTTRAIN_CPU_ATTENTION", "own") != "sdpa"


def _native_applies(query, key, value, dropout: float) -> bool:
    """The case posttrain's C++ kernels serve, with or without gradients (training, and the no-grad passes of
    eval and reference models over packed rows): on a CPU, no dropout, heads a multiple of the K/V heads, one
    dtype and head dimension for q, k and v, and either bf16 on a CPU with AVX512-BF16 and a head dimension
    that is a multiple of 32, or fp32 on a CPU with AVX2 and FMA and a multiple of 16; the kernel built and not
    switched off."""
    dtype = query.dtype
    if (query.device.type != "cpu" or dropout or query.shape[1] % key.shape[1] or not key.dtype == value.dtype == dtype
            or key.shape != value.shape or query.shape[-1] != key.shape[-1]):
        return False
    if dtype == torch.bfloat16:
        return query.shape[-1] % 32 == 0 and native.span_attention_library() is not None
    if dtype == torch.float32:
        return query.shape[-1] % 16 == 0 and native.span_attention_fp32_library() is not None
    return False


def _split_segments(query, key, value, segments, dropout, scaling):
    """Spans that tile each row: split the tensors instead of slicing them span by span. Autograd then
    concatenates the spans' gradients once per tensor; a slice's backward would write each span's gradient
    into a zero-filled tensor of the whole batch's size and sum them (on the 2-core CPU, ~1.4 s of memset and
    adds in a LoRA step of 8 x 512 tokens)."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if _native_applies(query, key, value, dropout):
        return _NativeSpanAttention.apply(query, key, value, span_table(segments), scale), None
    if _own_kernel_applies(query, key, value, dropout):

        def attend(q, k, v):
            return _CausalSpanAttention.apply(q, k, v, scale)[None]
    else:
        gqa = query.shape[1] != key.shape[1]

        def attend(q, k, v):
            return F.scaled_dot_product_attention(q[None], k[None], v[None], dropout_p=dropout, is_causal=True,
                                                  scale=scaling, enable_gqa=gqa)
    rows = []
    for spans, q_row, k_row, v_row in zip(segments, query.unbind(0), key.unbind(0), value.unbind(0)):
        lengths = [span[1] - span[0] for span in spans]
        parts = [attend(q, k, v)
                 for q, k, v in zip(q_row.split(lengths, 1), k_row.split(lengths, 1), v_row.split(lengths, 1))]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def _segments(query, key, value, segments, dropout, scaling):
    if _tiles(segments, query.shape[2]):
        return _split_segments(query, key, value, segments, dropout, scaling)
    if _covers(segments, query.shape[2], prefixes=True) and _native_applies(query, key, value, dropout):
        # shared prompts (RL groups): both C++ kernels serve spans that see a prefix
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        return _NativeSpanAttention.apply(query, key, value, span_table(segments), scale), None
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for r, spans in enumerate(segments):
        parts = []
        for span in spans:
            s, e = span[0], span[1]
            q, k, v = query[r : r + 1, :, s:e], key[r : r + 1, :, s:e], value[r : r + 1, :, s:e]
            if len(span) == 4 and span[3] > span[2]:  # a shared prefix every query of the span sees in full
                ps, pe = span[2], span[3]
                k = torch.cat([key[r : r + 1, :, ps:pe], k], dim=2)
                v = torch.cat([value[r : r + 1, :, ps:pe], v], dim=2)
                n = e - s
                allowed = torch.ones(n, pe - ps + n, dtype=torch.bool, device=query.device)
                allowed[:, pe - ps :] = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
                parts.append(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout,
                                                            scale=scaling, enable_gqa=gqa))
            else:
                parts.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                            scale=scaling, enable_gqa=gqa))
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def segments_from_table(table: torch.Tensor, num_rows: int) -> list[list[tuple[int, ...]]]:
    """(K, 5) [row, start, end, prefix_start, prefix_end] -> per row, its spans in order (see data.groups)."""
    out: list[list[tuple[int, ...]]] = [[] for _ in range(num_rows)]
    for row, start, end, ps, pe in table.tolist():
        out[row].append((start, end, ps, pe))
    return out


def register() -> None:
    """Make ``attn_implementation="packed_spans"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_spans_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # unpacked batches get transformers' usual sdpa mask


# Model types whose attention has sinks, which flash-attention 2 cannot compute (transformers needs a vLLM
# flash-attention 3 kernel from the hub for them): ``auto`` keeps them on packed_spans even with flash-attn.
_SINK_MODEL_TYPES = ("gpt_oss",)


def resolve(name: str, config) -> str:
    """The attention implementation to load ``config``'s model with. ``auto``: flash-attention 2 on CUDA when the
    package is installed and the family has no sinks; else ``packed_spans``, which is exact for every family
    (windows, soft-capping and sinks included, see :class:`LayerExtras`) and registered here."""
    if name == OLD_NAME:
        name = NAME
    if name not in ("auto", NAME):
        return name
    if name == "auto" and torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None \
            and getattr(config, "model_type", "") not in _SINK_MODEL_TYPES:
        return "flash_attention_2"
    register()
    return NAME


def layer_windows(config) -> dict[str, int | None]:
    """Each layer type of the model -> its sliding window (None: full causal attention). Without ``layer_types``
    a model with ``sliding_window`` set (Mistral, Phi-3) windows every layer."""
    window = getattr(config, "sliding_window", None) or None
    kinds = set(getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"])
    return {kind: window if kind == "sliding_attention" else None for kind in sorted(kinds)}


def describe(config, name: str) -> str | None:
    """One line for the run's log on how this family's attention is computed, or None for the plain case (plain
    causal attention through packed_spans' fast kernels) where there is nothing to say."""
    if name != NAME:
        return f"attention: {name}" + (" (per-layer packed masks carrying the sliding windows)"
                                       if getattr(config, "sliding_window", None) else "")
    features = []
    windows = layer_windows(config)
    window = windows.get("sliding_attention")
    if window:
        where = "every layer" if len(windows) == 1 else "its sliding_attention layers"
        features.append(f"a {window}-token sliding window on {where} (a longer sequence's span gets the window mask)")
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap:
        features.append(f"attention soft-capping at {softcap} (exact products per span)")
    if getattr(config, "model_type", "") in _SINK_MODEL_TYPES:
        features.append("attention sinks (exact products per span)")
    if not features:
        return None
    return f"attention: {NAME} with " + "; ".join(features) + "; plain causal spans take the fast kernels"
