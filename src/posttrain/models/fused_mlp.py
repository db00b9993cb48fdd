"""The Llama-form MLP's activation, ``silu(gate(x)) * up(x)``, as one autograd node on a CPU in fp32.

PyTorch computes it as ``silu`` then ``mul`` and its backward as two ``mul`` and a ``silu_backward`` (three
passes over the (tokens x intermediate) tensors), keeping ``silu(g)`` for backward next to ``g`` and ``u``. Here
the forward is PyTorch's own two ops (bit-identical to the eager module, so a trained model reloaded with plain
transformers gives the same logits) with ``silu(g)`` a temporary, and the backward is one pass of the C++ kernel
``kernels/swiglu_fp32_avx2.cpp`` (AVX2 and FMA, :mod:`posttrain.models.native`) reading dh, g and u and writing
dg and du. Only g and u are kept: a third less of the MLP's activation memory. On the AVX2 path's LoRA step of
SmolLM2-135M these ops were ~1.5 s of 18.3 s (docs/benchmarks.md, "What changed for the AVX2 path").

Routed: modules whose ``forward`` is Llama's MLP forward (``down(act(gate(x)) * up(x))``, checked against its
source) with a SiLU activation; Gemma's GELU MLPs and fused gate-up MLPs (Phi-3) keep their own. Used only for
fp32 CPU tensors of one shape with the kernel available; anything else (bf16 under autocast, CUDA, no compiler)
runs the module's own forward. Gradients are within a few fp32 ulp of PyTorch's (tested against float64).
"""

from __future__ import annotations

import functools
import inspect
import types

import torch

from posttrain.models import native


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        # PyTorch's own ops, so the forward is bit-identical to the eager module's (a model trained here and
        # reloaded with plain transformers gives the same logits); silu(gate) is a temporary, not kept
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        native.swiglu_library().posttrain_swiglu_backward(grad_out.data_ptr(), gate.data_ptr(), up.data_ptr(),
                                                          grad_gate.data_ptr(), grad_up.data_ptr(), gate.numel(),
                                                          torch.get_num_threads())
        return grad_gate, grad_up


def applies(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """The kernel serves these tensors: fp32 on a CPU, one shape, no autocast, kernel built and not switched off."""
    return (gate.device.type == "cpu" and gate.dtype == up.dtype == torch.float32 and gate.shape == up.shape
            and not torch.is_autocast_enabled("cpu") and native.swiglu_library() is not None)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, through the fused kernel where it :func:`applies`, else PyTorch's ops."""
    if applies(gate, up):
        return _SwiGLU.apply(gate, up)
    return torch.nn.functional.silu(gate) * up


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))  # act_fn is SiLU (enable checks it)


@functools.cache
def _llama_form(cls: type) -> bool:
    """``cls.forward`` is Llama's MLP forward, word for word."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    try:
        return cls.forward is LlamaMLP.forward or inspect.getsource(cls.forward) == inspect.getsource(LlamaMLP.forward)
    except (OSError, TypeError):
        return False


def _is_silu(act) -> bool:
    """torch's ``nn.SiLU`` or transformers' ``SiLUActivation`` (``ACT2FN["silu"]``, whose forward is ``F.silu``)."""
    if isinstance(act, torch.nn.SiLU):
        return True
    try:
        from transformers.activations import SiLUActivation
    except ImportError:
        return False
    return type(act) is SiLUActivation


def enable(model: torch.nn.Module) -> int:
    """Route every Llama-form SiLU MLP of ``model`` through :func:`_forward`; returns how many. Idempotent."""
    count = 0
    for module in model.modules():
        if (_is_silu(getattr(module, "act_fn", None)) and all(
                isinstance(getattr(module, name, None), torch.nn.Module) for name in ("gate_proj", "up_proj", "down_proj"))
                and _llama_form(type(module))):
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count
