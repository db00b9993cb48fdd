"""LoRA linear layers computed through one merged weight when that is cheaper: ``y = x (W + s B A)^T + b``.

PEFT computes a LoRA linear as ``x W^T + s * B(A(x))``. With rank r = 16 the low-rank branch is a matmul with
an inner dimension of 16, whose cost is writing its (tokens x out) output, then a scaling multiply and an add
over that same tensor; its backward repeats the pattern (a scaling multiply, a (tokens x r) x (r x in) matmul
and an add into the input gradient). On the project's 2-core CPU these memory-bound passes took about 12% of a
LoRA SFT step on SmolLM2-135M (profiled with 8 x 512 packed tokens; see docs/benchmarks.md).

For a long input the merged weight ``W + s B A`` costs ``2 r in out`` FLOPs to build, which is ``r / tokens``
of the base matmul (0.4% at 4,096 tokens and r 16), and removes all of those passes: the forward is one matmul,
the input gradient is one matmul against the same merged weight (rebuilt in backward rather than kept, so no
memory is added), and the adapter gradients use (tokens x r) intermediates only:

    dA = s (dY B)^T X        dB = s dY^T (X A^T)        dX = dY (W + s B A)

QLoRA's 4-bit base weight is dequantized for the merge, in forward and again in backward, which is what
bitsandbytes' own matmul does for it; PEFT's QLoRA forward also clones the base output, a pass this skips.
The merged weight is formed in float32 only: the (dequantized) base weight, the adapter weights and the input
must all be float32, because adding a small ``s B A`` to a bf16 weight would round the update away.
Under autocast (bf16/fp16 training) the layer instead keeps the branch unmerged but adds it inside the GEMM
(:func:`_low_rank_add`), which drops the branch's scaling multiply and add; the merged path never runs under
autocast, whose lower-precision output would not match its fp32 backward. The merged path is also skipped
for short inputs (generation, where merging would cost more than the matmul); both are skipped with dropout
on the adapter input, for DoRA and other variants, several active adapters, a trainable base weight, and when
the adapter is disabled or merged; those calls run PEFT's own forward unchanged. The adapter's parameters are
PEFT's: saving, loading and merging are untouched.
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F

# Merge only when the input holds at least this many tokens per unit of rank (merge cost / matmul = r / tokens).
MIN_TOKENS_PER_RANK = 32


def dense_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) base weight in ``dtype``; a bitsandbytes 4-bit weight is dequantized (as its own matmul
    does in every forward and backward). ``dequantize_4bit`` misreads a weight that bitsandbytes repacked for its CPU
    inference kernel (``packing_format_for_cpu``; models.loading.keep_4bit_layout prevents it): such a weight is
    put back in the standard layout first."""
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight
    import bitsandbytes.functional as bnbF

    if getattr(state, "packing_format_for_cpu", False):  # repacked by a model loaded without keep_4bit_layout
        weight.data, weight.quant_state = bnbF._convert_weight_packed_for_cpu_inverse(weight.data, state)  # as bnb's save does
        state = weight.quant_state
    return bnbF.dequantize_4bit(weight.data, state).to(dtype)


class _MergedLoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        merged = torch.addmm(dense_weight(weight, x.dtype), lora_b, lora_a, alpha=scaling)  # (out, in) = W + s B A
        ctx.save_for_backward(x, lora_a, lora_b)
        ctx.weight = weight  # a frozen parameter (possibly 4-bit): kept by reference, never copied
        ctx.scaling = scaling
        ctx.bias_grad = bias is not None and bias.requires_grad
        return F.linear(x, merged, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        dy = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        dx = da = db = dbias = None
        if ctx.needs_input_grad[0]:
            dx = (dy @ torch.addmm(dense_weight(ctx.weight, x.dtype), lora_b, lora_a, alpha=s)).view(x.shape)
        if ctx.needs_input_grad[3]:
            da = (dy @ lora_b).mul_(s).t() @ x2  # (r, in)
        if ctx.needs_input_grad[4]:
            db = dy.t() @ (x2 @ lora_a.t()).mul_(s)  # (out, r)
        if ctx.bias_grad:
            dbias = dy.sum(0)
        return dx, None, dbias, da, db, None


def _fusable(layer, x: torch.Tensor, args, kwargs):
    """The adapter to merge, or None when PEFT's forward must run (see the module docstring)."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    base = layer.base_layer
    if base.weight.requires_grad:
        return None
    if type(base) is torch.nn.Linear:
        dtype = base.weight.dtype
    elif (state := getattr(base.weight, "quant_state", None)) is not None:  # bitsandbytes Linear4bit
        if getattr(state, "packing_format_for_cpu", False) or len(state.shape) != 2:
            return None
        dtype = base.compute_dtype or x.dtype
    else:
        return None
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if torch.is_autocast_enabled(x.device.type):
        # autocast decides the matmuls' dtype (its output would not match the merged path's fp32 backward):
        # whatever x's dtype (bf16, or fp32 from an fp32 QLoRA base under CPU bf16 autocast), add in one addmm
        return (name, "low-rank add") if a.dtype == b.dtype == torch.float32 else None
    if x.dtype == dtype == a.dtype == b.dtype == torch.float32:
        if x.numel() // x.shape[-1] < MIN_TOKENS_PER_RANK * a.shape[0]:
            return None
        return name, "merged"
    return None


def _low_rank_add(layer, x: torch.Tensor, name: str) -> torch.Tensor:
    """Under autocast: ``base(x)`` plus the low-rank branch added inside one ``addmm``,
    ``y = base(x) + (x A^T)(s B)^T``. PEFT's ``result + lora_B(lora_A(x)) * scaling`` writes the (tokens x out)
    branch, multiplies it by s and adds it, three passes over the output that the GEMM's accumulate replaces;
    its backward loses the scaling multiply too (s scales the (out x r) weight instead). One rounding of the sum
    instead of three; the adapter stays fp32 (autocast casts it for the matmul)."""
    result = layer.base_layer(x)
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    low = F.linear(x, lora_a)  # (..., r)
    flat = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]),
                       (lora_b * float(layer.scaling[name])).t())
    return flat.view(result.shape).to(result.dtype)


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    merged = getattr(self, "_posttrain_merged", None)
    if merged is not None and not torch.is_grad_enabled() and not args and not kwargs and x.dtype == merged.dtype \
            and not torch.is_autocast_enabled(x.device.type):
        return F.linear(x, merged, self.base_layer.bias)  # inside merged_for_decoding
    plan = _fusable(self, x, args, kwargs)
    if plan is None:
        return type(self).forward(self, x, *args, **kwargs)
    name, how = plan
    if how == "low-rank add":
        return _low_rank_add(self, x, name)
    base = self.base_layer
    return _MergedLoRALinear.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                   float(self.scaling[name]))


# Of the memory the OS reports available, at most this share may go to merged_for_decoding's weight copies.
DECODE_MERGE_MEMORY_SHARE = 0.25


def _available_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0


@contextlib.contextmanager
def merged_for_decoding(model: torch.nn.Module) -> Iterator[int]:
    """Within the block, no-gradient forwards of the routed fp32 LoRA linears use ``W + s B A`` formed once
    on entry, instead of PEFT's ``x W^T + s B(A(x))`` at every call. Yields how many layers were merged.

    For generation: a decoding step is a few rows per call, below the per-call merge's break-even
    (:data:`MIN_TOKENS_PER_RANK`), so PEFT's branch (two small matmuls, a scaling multiply and an add per layer
    and token step) ran for each of the 64 steps of a rollout. Merging once per rollout costs ``2 r in out`` FLOPs
    per layer (40-54 ms for SmolLM2-135M) and made the rollout engine 1.14-1.17x faster on a CPU
    (docs/benchmarks.md); the log-probs move by fp32 rounding only (up to 3e-5 there), as the training forward's
    own merged path does. Taken only on a CPU (GPU memory is dearer and its small matmuls cheaper), for layers the
    merged path serves (one active plain adapter, an unquantized fp32 base; a 4-bit base would need a full-size
    copy), and only when the copies fit in :data:`DECODE_MERGE_MEMORY_SHARE` of the available memory.
    ``POSTTRAIN_DECODE_MERGE=0`` turns it off. The base weights are never modified; the copies are dropped on
    exit."""
    layers = []
    if os.environ.get("POSTTRAIN_DECODE_MERGE", "1") != "0":
        for layer in model.modules():
            if type(layer) in _lora_linear_types() and getattr(layer.forward, "__func__", None) is _forward:
                base = layer.base_layer
                active = [a for a in layer.active_adapters if a in layer.lora_A]
                if (type(base) is torch.nn.Linear and type(base.weight.detach()) is torch.Tensor  # not a DTensor
                        and base.weight.device.type == "cpu"
                        and base.weight.dtype == torch.float32 and not base.weight.requires_grad and len(active) == 1
                        and active[0] not in getattr(layer, "lora_variant", {}) and not layer.disable_adapters
                        and not layer.merged and layer.lora_A[active[0]].weight.dtype == torch.float32):
                    layers.append((layer, active[0]))
    needed = sum(layer.base_layer.weight.numel() * 4 for layer, _ in layers)
    if needed > DECODE_MERGE_MEMORY_SHARE * _available_bytes():
        layers = []
    try:
        with torch.no_grad():
            for layer, name in layers:
                layer._posttrain_merged = torch.addmm(layer.base_layer.weight, layer.lora_B[name].weight,
                                                      layer.lora_A[name].weight, alpha=float(layer.scaling[name]))
        yield len(layers)
    finally:
        for layer, _ in layers:
            layer.__dict__.pop("_posttrain_merged", None)


def _lora_linear_types() -> tuple[type, ...]:
    from peft.tuners.lora.layer import Linear

    types_ = [Linear]
    try:
        from peft.tuners.lora.bnb import Linear4bit

        types_.append(Linear4bit)
    except ImportError:  # bitsandbytes absent
        pass
    return tuple(types_)


def enable(model: torch.nn.Module) -> int:
    """Route every PEFT LoRA ``Linear`` (and 4-bit ``Linear4bit``) of ``model`` through the merged-weight path
    where it applies; returns how many layers were routed. Idempotent."""
    kinds = _lora_linear_types()
    count = 0
    for module in model.modules():
        if type(module) in kinds:
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count
