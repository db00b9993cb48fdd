"""RMSNorm as one autograd node: three passes forward and three backward, nothing but its input kept for backward.

transformers' Llama-family RMSNorm is written as autograd ops: ``x.pow(2)``, ``mean``, ``rsqrt``, ``x * r``,
``weight * xhat``. Autograd keeps ``x``, ``r`` and the normalised ``xhat`` (a third (tokens x hidden) tensor per
norm, two norms a layer) and its backward runs about eight passes over (tokens x hidden) tensors. This module
computes the same function as one autograd node:

    forward    r = (mean(x^2) + eps)^-1/2         (the eager module's ops, one pass: bit-identical output)
               y = (x * r) * w                    (one pass writing y, one in place)
    backward   gw = dy * w
               dx = r gw - x r^3 (gw . x) / H     (a reduction, one in-place scale, one in-place addcmul)
               dw = sum_t dy x r                  (only when the weight trains: full fine-tuning)

It keeps ``x`` (the residual stream, alive anyway) and the per-token ``r``; a trained norm (full fine-tuning)
no longer keeps a normalised copy. On the project's 2-core CPU the forward+backward of one (8 x 512 x 576) norm
took 12-14 ms against 18-22 ms for the eager module (microbenchmark, same inputs). A ``vector_norm`` reduction
instead of ``pow(2).mean`` was faster still (6-12 ms) but rounds differently, and a trained model would then
give logits ~1e-4 away from the same model reloaded with plain transformers.

A bf16/fp16 input (a bf16 base under autocast) takes :class:`_RMSNormHalf` with gradients: the same function
rounded where the eager module rounds, ``weight * x_normed.to(input_dtype)``, which only the families in
``_HALF_ROUNDS_LIKE_LLAMA`` share (a test compares their source with Llama's; Olmo2 rounds after the weight
product and keeps its own forward). It keeps the bf16 input instead of the eager module's fp32 upcast (2 bytes
per element less, two norms a layer; the step time it saves is in docs/benchmarks.md, "Measurements behind the code"). Only norms whose eager formula is ``weight * x / rms(x)`` are routed (Gemma's
``(1 + weight)`` form is not in the list).
"""

from __future__ import annotations

import types

import torch

# RMSNorm classes computing weight * x * rsqrt(mean(x^2) + variance_epsilon) (identical in float32).
_LLAMA_FORM = frozenset({
    "LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Qwen2MoeRMSNorm",
    "Qwen3MoeRMSNorm", "Phi3RMSNorm", "GraniteRMSNorm", "Olmo2RMSNorm", "SmolLM3RMSNorm",
})


# Of those, the ones whose half-precision input is rounded where Llama's is: ``weight * x_normed.to(input_dtype)``
# (Olmo2 rounds after the weight product). A test compares their forward's source with Llama's.
_HALF_ROUNDS_LIKE_LLAMA = _LLAMA_FORM - {"Olmo2RMSNorm"}


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        # the same ops as the eager module's, so the forward is bit-identical to it (a model trained here and
        # reloaded with plain transformers gives the same logits)
        rms_inv = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rms_inv)
        return (x * rms_inv).mul_(weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rms_inv = ctx.saved_tensors
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad_out * x).mul_(rms_inv).sum(dim=tuple(range(x.dim() - 1)))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(grad_out * weight, x, rms_inv)
        return grad_x, grad_w, None


def _input_grad(grad_normed: torch.Tensor, x: torch.Tensor, rms_inv: torch.Tensor) -> torch.Tensor:
    """dx = r g - x r^3 (g . x) / H for g = dL/d(x r), all fp32; overwrites and returns ``grad_normed``."""
    coef = torch.linalg.vecdot(grad_normed, x, dim=-1).unsqueeze(-1)
    coef.mul_(rms_inv.pow(3)).div_(-x.shape[-1])
    return grad_normed.mul_(rms_inv).addcmul_(x, coef)


class _RMSNormHalf(torch.autograd.Function):
    """The Llama-form norm of a bf16/fp16 input: ``weight * half(x32 * r)``, rounded where the eager module
    rounds (after the normalisation, before the weight product, whose dtype follows PyTorch's promotion).

    The eager module keeps the fp32 upcast of x (twice the input's bytes) and runs about eight passes; this
    keeps the half-precision x itself and the per-token r, and recomputes the upcast in backward. Forward
    bit-identical (the eager ops in the same order); backward in fp32 from the same inputs."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        upcast = x.float()
        rms_inv = upcast.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
        normed = upcast.mul_(rms_inv).to(x.dtype)
        ctx.save_for_backward(x, weight, rms_inv)
        return weight * normed

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rms_inv = ctx.saved_tensors
        upcast = x.float()
        grad_w = None
        if ctx.needs_input_grad[1]:
            normed = (upcast * rms_inv).to(x.dtype)
            grad_w = (grad_out * normed).sum(dim=tuple(range(x.dim() - 1))).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # the eager mul's gradient, cast back up by .to()'s backward
            grad_x = _input_grad((grad_out * weight).float(), upcast, rms_inv).to(x.dtype)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension, as one autograd node (float32)."""
    return _RMSNorm.apply(x, weight, eps)


def _forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype == self.weight.dtype == torch.float32:
        return rms_norm(hidden_states, self.weight, float(self.variance_epsilon))
    if hidden_states.dtype in (torch.bfloat16, torch.float16) and type(self).__name__ in _HALF_ROUNDS_LIKE_LLAMA \
            and torch.is_grad_enabled():
        return _RMSNormHalf.apply(hidden_states, self.weight, float(self.variance_epsilon))
    return type(self).forward(self, hidden_states)


def enable(model: torch.nn.Module) -> int:
    """Route every Llama-form RMSNorm of ``model`` through the fused function (float32 inputs; others run the
    module's own forward); returns how many were routed. Idempotent."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in _LLAMA_FORM and hasattr(module, "variance_epsilon") \
                and getattr(module, "weight", None) is not None and module.weight.dim() == 1:
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count
