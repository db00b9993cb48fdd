"""One forward path for every stage: a batch in, the log-probabilities of its target tokens out.

Memory-lean: the output projection and the log-softmax run only at target positions, in chunks of
``chunk_size`` positions, each chunk's gradient formed in the forward (a frozen head) or the chunk recomputed in
backward (activation checkpointing, a trained head), so neither the
(B, T, V) logits nor their fp32 log-softmax ever exist. With a 49k vocabulary and 8 x 512 tokens that is
~800 MB of fp32 logits (plus as much again for their gradient) that are never allocated; at 150k+ vocabularies
it is most of the step's activation memory.

How: during the forward the causal LM's output head is swapped for a pass-through, so the model returns its
final hidden states in ``.logits``; then the real head is applied to the selected rows. This goes through the
model's own ``forward`` (and so through DDP's and PEFT's wrappers), works for tied or untied heads, and for a
LoRA-wrapped head.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from posttrain.losses import IGNORE_INDEX, shift_labels
from posttrain.models import router

DEFAULT_CHUNK = 1024
_HEAD_BLOCK_ROWS = 128  # rows per block inside a frozen head's chunk (see _FrozenHeadLogps.forward)
# Rows per checkpointed chunk of a trained head (full fine-tuning), at most: its backward holds three fp32
# (rows x V) tensors, which at 1024 rows of a 49k vocabulary are 200 MB of fresh memory for the OS to fault in on
# every call (the A/B that chose 256: docs/benchmarks.md, "Measurements behind the code").
_TRAINED_HEAD_CHUNK_ROWS = 256


class _PassThrough(torch.nn.Module):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


@functools.cache
def cache_kwarg() -> str:
    """The name of a model forward's KV-cache argument. transformers 5.24 renamed ``past_key_values`` to ``cache``
    (the old name warns from then on); before 5.24 a ``cache=`` argument is silently ignored, which would decode
    every step without its context. vLLM 0.32's builds pin transformers below 5.20, so both occur."""
    from importlib.metadata import version

    from packaging.version import Version

    return "cache" if Version(version("transformers")) >= Version("5.24") else "past_key_values"


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM inside DDP / PEFT wrappers."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    if hasattr(inner, "get_base_model"):  # peft.PeftModel
        inner = inner.get_base_model()
    return inner


@contextlib.contextmanager
def head_bypassed(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block ``model(...)`` returns final hidden states; yields the real output head.

    The family's own mapping of the head's output (:class:`LogitMap`: Granite's scaling, Gemma's soft-cap) is
    switched off in the config for the block, or it would be applied to the hidden states; the lean head
    applies it to the logits instead."""
    lm = _causal_lm(model)
    head = lm.get_output_embeddings()
    assert head is not None, f"{type(lm).__name__} has no output embeddings"
    name = "lm_head" if getattr(lm, "lm_head", None) is head else None
    assert name is not None, f"{type(lm).__name__}: output head is not `lm_head`"
    saved = {key: getattr(lm.config, key) for key, neutral in _LOGIT_MAP_KEYS.items() if hasattr(lm.config, key)}
    setattr(lm, name, _PassThrough())
    for key in saved:
        setattr(lm.config, key, _LOGIT_MAP_KEYS[key])
    try:
        yield head
    finally:
        setattr(lm, name, head)
        for key, value in saved.items():
            setattr(lm.config, key, value)


_LOGIT_MAP_KEYS = {"logits_scaling": 1.0, "final_logit_softcapping": None}  # config key -> its identity value


@contextlib.contextmanager
def lora_input_casts_off(model: torch.nn.Module) -> Iterator[None]:
    """Under autocast, plain LoRA layers skip PEFT's cast of their input to the adapter's fp32 dtype.

    With a bf16 base and fp32 adapters, PEFT casts each adapted linear's bf16 input to fp32 and autocast then
    casts it straight back to bf16 for ``lora_A``'s matmul: two full passes over the input per adapted linear
    (seven per layer) and a bf16 copy per linear kept for backward. The values are bf16 either way, so the
    product is the same; only the copies go. Outside autocast (an fp32 model, or generation without it) nothing
    changes, so an fp32 adapter never meets a bf16 input it cannot multiply. DoRA layers keep the cast."""
    device = _device_type(model)
    if device is None or not torch.is_autocast_enabled(device):
        yield
        return
    layers = [m for m in _plain_lora_layers(model) if getattr(m, "cast_input_dtype_enabled", True)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.cast_input_dtype_enabled = True


_LORA_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plain_lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's LoRA layers without a variant (DoRA), found once per model: walking SmolLM2's 2,499 modules
    took 4 ms, in every forward."""
    layers = _LORA_LAYERS.get(model)
    if layers is None:
        layers = [m for m in model.modules() if hasattr(m, "lora_A") and not getattr(m, "lora_variant", None)]
        _LORA_LAYERS[model] = layers
    return layers


def _device_type(model: torch.nn.Module) -> str | None:
    param = next(model.parameters(), None)
    return None if param is None else param.device.type


def uses_varlen_attention(model: torch.nn.Module) -> bool:
    """Flash-attention kernels take packed sequences as one flattened row plus restarting position ids."""
    return getattr(_causal_lm(model).config, "_attn_implementation", "") in ("flash_attention_2", "flash_attention_3")


def uses_segment_attention(model: torch.nn.Module) -> bool:
    from posttrain.models.attention import NAME

    return getattr(_causal_lm(model).config, "_attn_implementation", "") == NAME


def model_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(input_ids, labels, forward kwargs) for ``batch``, shaped for the model's attention kernel.

    A packed batch carries a (B, 1, T, T) block-diagonal mask. With ``packed_spans`` the mask is dropped and
    each sequence's span (from the restarting position ids) is attended to on its own. With flash-attention the
    rows are flattened into one varlen sequence: transformers derives the sequence boundaries from the position
    ids, and attention costs sum(len_i^2), not T^2. Both are safe because every sequence's first label is -100
    and padding has label -100, so no target crosses a sequence boundary.
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    kwargs = {"attention_mask": batch["attention_mask"], "use_cache": False}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    if batch["attention_mask"].dim() == 4:
        if uses_varlen_attention(model):
            if "segment_table" in batch:
                raise NotImplementedError("shared-prompt batches need packed_spans, sdpa or eager attention")
            input_ids, labels = input_ids.reshape(1, -1), labels.reshape(1, -1)
            kwargs["position_ids"] = batch["position_ids"].reshape(1, -1)
            kwargs["attention_mask"] = None
        elif uses_segment_attention(model):
            from posttrain.models.attention import segments_from_positions, segments_from_table

            if "segment_table" in batch:  # explicit spans, some with a shared prefix (data.groups)
                kwargs["segments"] = segments_from_table(batch["segment_table"], input_ids.shape[0])
            else:
                kwargs["segments"] = segments_from_positions(batch["position_ids"])
            kwargs["attention_mask"] = None
        else:
            kwargs["attention_mask"] = layer_masks(model, batch["attention_mask"], batch["position_ids"])
    return input_ids, labels, kwargs


def layer_masks(model: torch.nn.Module, allowed: torch.Tensor, position_ids: torch.Tensor):
    """A packed batch's (B, 1, T, T) boolean structure mask as the model's layers need it under ``sdpa`` or
    ``eager``: with each layer type's sliding window applied by position (a query at position i sees keys at
    positions j > i - window, as transformers' own window masks), and additive (0 / dtype minimum) for eager,
    which adds a given mask to its scores. transformers uses a given 4-D mask as it is, so a window it does not
    carry here would be lost. Families with several layer types (Gemma 2/3, gpt-oss, ...) take a dict
    ``{layer type: mask}``; the others one mask."""
    from posttrain.models.attention import layer_windows

    config = _causal_lm(model).config
    windows = layer_windows(config)
    eager = config._attn_implementation == "eager"
    if eager:
        dtype = next(model.parameters()).dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
    if any(w is not None for w in windows.values()):
        distance = position_ids[:, None, :, None] - position_ids[:, None, None, :]  # (B, 1, T, T) query - key
    masks = {}
    for kind, window in windows.items():
        mask = allowed if window is None else allowed & (distance < window)  # keeps the diagonal: no empty row
        if eager:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        masks[kind] = mask
    return masks if len(masks) > 1 else next(iter(masks.values()))


@dataclass(frozen=True)
class LogitMap:
    """What a family's causal-LM forward does to the head's output before the loss sees it, which the lean head
    (it bypasses that forward) must do too: Granite divides the logits by ``logits_scaling``; Gemma 2/3
    soft-cap them, z = c tanh(l / c) with c = ``final_logit_softcapping``. Identity for the other families."""

    divisor: float = 1.0
    softcap: float | None = None

    @staticmethod
    def of(model: torch.nn.Module) -> LogitMap:
        config = _causal_lm(model).config
        return LogitMap(float(getattr(config, "logits_scaling", None) or 1.0),
                        getattr(config, "final_logit_softcapping", None) or None)

    def apply(self, logits: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """(n, V) fp32 head outputs -> the family's logits; ``inplace`` (no autograd through it) saves copies."""
        if self.divisor != 1.0:
            logits = logits.div_(self.divisor) if inplace else logits / self.divisor
        if self.softcap is not None:
            logits = (logits.div_(self.softcap).tanh_().mul_(self.softcap) if inplace
                      else torch.tanh(logits / self.softcap) * self.softcap)
        return logits

    def slope(self, logits: torch.Tensor) -> torch.Tensor | None:
        """d z / d l for the soft-cap, from the capped logits z: 1 - (z / c)^2 (the divisor's 1/d is applied once
        to the whole gradient by the caller). None without a soft-cap."""
        if self.softcap is None:
            return None
        return 1.0 - (logits / self.softcap).square_()


IDENTITY = LogitMap()


def _chunk_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                 logit_map: LogitMap = IDENTITY) -> torch.Tensor:
    logits = logit_map.apply(head(hidden).float())  # (n, V)
    if temperature != 1.0:
        logits = logits / temperature
    return -F.cross_entropy(logits, targets, reduction="none")  # (n,) log p(target)


class _FrozenHeadLogps(torch.autograd.Function):
    """log p(target) of a chunk through a frozen linear head, its gradient formed in the forward pass.

    log p_i = z_i[t_i] - logsumexp(z_i) with z_i = (W h_i + b) / T depends on row i's hidden state only, so
    its gradient is a vector per row: d log p_i / d h_i = (W[t_i] - p_i W) / T, p_i = softmax(z_i). Computing
    it while the chunk's logits exist costs one (n x V) x (V x H) matmul and keeps (n x H) numbers; the
    checkpointed path instead recomputes the logits in backward and then runs the log-softmax backward and that
    same matmul, so this saves a third of the head's matmuls and a pass over the logits. Used only when no
    head parameter is trained (adapter methods); a trained head needs the logits' gradient for its weight.
    With a family's :class:`LogitMap`, z = map(l): the gradient is (W[t] - p W) scaled per logit by dz/dl,
    i.e. ((p - onehot(t)) * dz/dl) W, negated.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, logit_map: LogitMap = IDENTITY):
        grad = ctx.needs_input_grad[0]
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        jac = torch.empty(hidden.shape[0], weight.shape[1], dtype=weight.dtype, device=hidden.device) if grad else None
        # rows in blocks: the fp32 (rows x V) temporaries of a 1024-row chunk are 200 MB each, fresh memory the
        # OS must fault in on every call; 128-row blocks (25 MB) stay in the allocator's reuse, with bit-identical
        # results (timings: docs/benchmarks.md, "Measurements behind the code")
        for start in range(0, hidden.shape[0], _HEAD_BLOCK_ROWS):
            end = min(start + _HEAD_BLOCK_ROWS, hidden.shape[0])
            logits = logit_map.apply(F.linear(hidden[start:end], weight, bias).float(), inplace=True)  # (rows, V)
            slope = logit_map.slope(logits) if grad else None
            if temperature != 1.0:
                logits.div_(temperature)
            logprobs = torch.log_softmax(logits, dim=-1)
            del logits
            block_targets = targets[start:end]
            logps[start:end] = logprobs.gather(1, block_targets[:, None]).squeeze(1)
            if grad:
                delta = logprobs.exp_()  # softmax p, in place
                delta[torch.arange(end - start, device=delta.device), block_targets] -= 1.0  # p - onehot(t), fp32
                if slope is not None:
                    delta.mul_(slope)
                jac[start:end] = delta.to(weight.dtype) @ weight  # W[t] - p W (negated below), no bf16 cancellation
            del logprobs, slope
        if grad:
            jac.neg_()
            if temperature * logit_map.divisor != 1.0:
                jac.div_(temperature * logit_map.divisor)
            ctx.save_for_backward(jac.to(hidden.dtype))
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        (jac,) = ctx.saved_tensors
        return grad_logps.to(jac.dtype)[:, None] * jac, None, None, None, None, None


def _frozen_linear(head: torch.nn.Module) -> bool:
    return type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters())


def head_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int = DEFAULT_CHUNK,
               temperature: float = 1.0, logit_map: LogitMap = IDENTITY) -> torch.Tensor:
    """log p(target) for (N, H) hidden rows, chunk by chunk; the head's outputs mapped as the family's forward
    maps them (``logit_map``), then divided by ``temperature`` (RL evaluates the distribution it sampled from).
    Returns (N,) fp32. With gradients: a frozen linear head forms each chunk's
    gradient in the forward (:class:`_FrozenHeadLogps`); any other head is checkpointed per chunk of at most
    ``_TRAINED_HEAD_CHUNK_ROWS`` rows."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    grad = torch.is_grad_enabled() and hidden.requires_grad
    frozen = grad and _frozen_linear(head)
    if grad and not frozen:
        chunk_size = min(chunk_size, _TRAINED_HEAD_CHUNK_ROWS)
    parts = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if frozen:
            parts.append(_FrozenHeadLogps.apply(h, head.weight, head.bias, t, temperature, logit_map))
        elif grad:
            parts.append(checkpoint(_chunk_logps, head, h, t, temperature, logit_map, use_reentrant=False))
        else:
            parts.append(_chunk_logps(head, h, t, temperature, logit_map))
    return torch.cat(parts)


def target_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = DEFAULT_CHUNK,
                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the batch's target tokens.

    Args:
        batch: ``input_ids`` (B, T), ``labels`` (B, T) (-100 = not a target), ``attention_mask`` (B, T) or
            a (B, 1, T, T) packed mask, optional ``position_ids`` (B, T).
        temperature: the logits are divided by it before the softmax (1 for every stage but RL sampling).
    Returns:
        logps (N,) fp32 for the N target tokens in row-major order, and the (B, T) boolean mask of the
        positions that predict them (position t predicts token t+1).
    """
    logps, predicts, _ = target_logps_and_values(model, batch, chunk_size, temperature)
    return logps, predicts


def target_logps_and_values(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = DEFAULT_CHUNK,
                            temperature: float = 1.0, value_head: torch.nn.Module | None = None):
    """:func:`target_logps` plus, with ``value_head`` (H -> 1), the value estimate at each predicting position
    from the same forward pass's final hidden states (PPO's policy + value head on one backbone): (N,) fp32 or None."""
    input_ids, labels, kwargs = model_inputs(model, batch)
    logit_map = LogitMap.of(model)  # read before head_bypassed neutralises it in the config
    config = _causal_lm(model).config
    if router.wanted(config):
        kwargs["output_router_logits"] = True
    with head_bypassed(model) as head, lora_input_casts_off(model):
        output = model(input_ids=input_ids, **kwargs)
        router.record(config, output)
        hidden = output.logits  # (B, T', H); T' = T + virtual tokens for prompt tuning
        hidden = hidden[:, -input_ids.shape[1]:]  # (B, T, H)
        targets = shift_labels(labels)  # (B, T)
        predicts = targets != IGNORE_INDEX
        rows = hidden[predicts]
        logps = head_logps(head, rows, targets[predicts], chunk_size, temperature, logit_map)
    values = None if value_head is None else value_head(rows.to(value_head.weight.dtype)).squeeze(-1).float()
    return logps, predicts.reshape(batch["labels"].shape), values  # (B, T) even when flattened for varlen attention


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each sequence's target tokens, for a batch from ``data.preference.collate_sequences``.

    Returns (S,) fp32 sums and (S,) target-token counts, S = number of sequences (``last_index`` rows). Same
    forward as SFT (:func:`target_logps`: packed rows, chunked head), so preference and RL stages share it.
    """
    logps, predicts = target_logps(model, batch, chunk_size)  # (N,), (B, T)
    which = batch["sequence_ids"][predicts]  # (N,) sequence of each target: position t and t+1 share one
    n = batch["last_index"].shape[0]
    sums = torch.zeros(n, dtype=logps.dtype, device=logps.device).index_add(0, which, logps)
    counts = torch.bincount(which, minlength=n)
    return sums, counts


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    inner = _causal_lm(model)
    return getattr(inner, inner.base_model_prefix)


def sequence_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scalar score of each sequence from a sequence-classification model with one label (a reward model).

    The model runs through its own forward (so DDP and PEFT wrappers apply); a hook keeps the backbone's
    hidden states and the score head is read at each sequence's ``last_index``, the last non-padding token,
    which is where transformers' ``*ForSequenceClassification`` reads it for an unpacked sequence. Packed rows
    work too, because the positions are per sequence. Returns (S,) fp32.
    """
    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    input_ids, _, kwargs = model_inputs(model, batch)
    if input_ids.shape != batch["input_ids"].shape:  # flattened for varlen attention: read it back per row
        raise NotImplementedError("reward scores with flash-attention varlen: use attn_implementation=packed_spans")
    handle = _backbone(model).register_forward_hook(keep)
    try:
        with lora_input_casts_off(model):
            model(input_ids=input_ids, **kwargs)
    finally:
        handle.remove()
    hidden = captured[-1][:, -batch["input_ids"].shape[1]:]  # (B, T, H); drop prompt-tuning virtual tokens
    rows, cols = batch["last_index"].unbind(-1)
    head = _causal_lm(model).score
    return head(hidden[rows, cols]).squeeze(-1).float()  # (S,)
