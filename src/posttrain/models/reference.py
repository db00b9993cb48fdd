"""The reference model of preference and RL stages, without a second model in memory where possible.

Strategies, chosen by :func:`make_reference`:

- ``disabled_adapter``: adapter methods trained from scratch. The reference is the base model, which is the
  policy with its adapter switched off: no copy at all.
- ``reference_adapter``: LoRA/QLoRA starting from an adapter (``adapter:``, e.g. an SFT adapter). The reference
  is that starting model, so a frozen second copy of the ADAPTER (megabytes) is loaded next to the trainable
  one and switched in for the reference pass.
- ``frozen_copy``: full fine-tuning. A frozen copy of the initial weights.
- ``precomputed``: ``precompute_ref: true``. The initial model's log-probs of every training and eval
  sequence are computed once before training and stored with the examples (and on disk, so a resumed run
  reuses them): one forward per step instead of two, and nothing extra in memory, for every method.

Reference passes run without gradients, in eval mode (no dropout), on the unwrapped model (no DDP sync).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from posttrain.errors import ConfigError
from posttrain.models.adapters import is_peft
from posttrain.models.loading import unwrap

REFERENCE_ADAPTER = "reference"
CACHE_FILE = "reference_logps.safetensors"


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def active_adapter(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Switch a PeftModel to adapter ``name`` for a block, leaving every ``requires_grad`` flag as it was
    (PEFT's set_adapter also changes which adapter is trainable)."""
    previous = model.active_adapter
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for p, flag in flags:
            p.requires_grad_(flag)


class Reference:
    """Computes reference outputs ``fn(model, batch)`` for a batch of the policy's data."""

    def __init__(self, kind: str, frozen: torch.nn.Module | None = None):
        self.kind = kind
        self.frozen = frozen

    def describe(self) -> str:
        return {
            "disabled_adapter": "the base model (the policy with its adapter disabled; no copy in memory)",
            "reference_adapter": "the starting adapter (a frozen copy of the adapter, not of the model)",
            "frozen_copy": "a frozen copy of the initial model",
            "precomputed": "log-probs precomputed once with the initial model",
            "none": "none (reference-free loss)",
        }[self.kind]

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], fn: Callable) -> torch.Tensor:
        if self.kind in ("precomputed", "none"):
            raise AssertionError(f"reference {self.kind} has no forward pass")
        if self.kind == "frozen_copy":
            return fn(self.frozen, batch)
        inner = unwrap(model)
        with eval_mode(inner):
            if self.kind == "disabled_adapter":
                with inner.disable_adapter():
                    return fn(inner, batch)
            with active_adapter(inner, REFERENCE_ADAPTER):
                return fn(inner, batch)


def make_reference(model: torch.nn.Module, cfg, *, needed: bool = True, device: torch.device | None = None) -> Reference:
    """Pick the strategy (see the module docstring) before ``accelerator.prepare``; may load a reference adapter.
    ``device``: where a frozen copy goes (the policy's device once prepared)."""
    if not needed:
        return Reference("none")
    if getattr(cfg, "precompute_ref", False):
        return Reference("precomputed")
    if not is_peft(model):
        frozen = copy.deepcopy(model)
        frozen.requires_grad_(False)
        frozen.eval()
        if device is not None:
            frozen.to(device)
        return Reference("frozen_copy", frozen)
    if cfg.adapter:
        if cfg.method not in ("lora", "qlora"):
            raise ConfigError(
                f"adapter: starting {cfg.method} tuning from an adapter needs precompute_ref=true (the reference "
                "is then the starting model, computed once)"
            )
        model.load_adapter(cfg.adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        return Reference("reference_adapter")
    return Reference("disabled_adapter")


def drop_reference_adapter(model: torch.nn.Module) -> None:
    """Remove the frozen reference adapter before the trained one is saved."""
    inner = unwrap(model)
    if is_peft(inner) and REFERENCE_ADAPTER in inner.peft_config:
        inner.delete_adapter(REFERENCE_ADAPTER)


# ------------------------------------------------------------------------------------------ precomputed
def fingerprint(cfg, sequences: list[list[int]]) -> str:
    """Identifies what the cached log-probs depend on: the model, the starting adapter, the method, the tokens."""
    h = hashlib.sha256(json.dumps([cfg.model, cfg.adapter, cfg.method, cfg.max_length]).encode())
    for ids in sequences:
        h.update(len(ids).to_bytes(4, "little"))
        h.update(torch.tensor(ids, dtype=torch.int32).numpy().tobytes())
    return h.hexdigest()


def load_cached(output_dir: str | Path, key: str) -> torch.Tensor | None:
    """The cached tensor stored under ``key`` (a fingerprint), or None."""
    from safetensors import safe_open

    path = Path(output_dir) / CACHE_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key) if key in f.keys() else None


def save_cached(output_dir: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path = Path(output_dir) / CACHE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


@torch.no_grad()
def compute_logps(model, seqs, *, pad_id: int, pack_capacity: int | None, batch_size: int, accelerator,
                  chunk_size: int, desc: str) -> torch.Tensor:
    """Summed target log-probs of ``seqs`` under ``model`` as it is now: (n,) fp64 on CPU.

    Sharded over processes (each computes every world-th sequence) and summed back, so all processes get all.
    """
    from tqdm.auto import tqdm

    from posttrain.data.preference import collate_sequences
    from posttrain.models.forward import sequence_logps

    world, rank = accelerator.num_processes, accelerator.process_index
    mine = list(range(rank, len(seqs), world))
    out = torch.zeros(len(seqs), dtype=torch.float64)
    with eval_mode(model):
        for start in tqdm(range(0, len(mine), batch_size), desc=desc, unit="batch",
                          disable=not accelerator.is_main_process):
            chunk = mine[start:start + batch_size]
            batch = collate_sequences([seqs[i] for i in chunk], pad_id, pack_capacity)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                sums, _ = sequence_logps(model, batch, chunk_size)
            out[chunk] = sums.double().cpu()
    if world > 1:
        out = accelerator.reduce(out.to(accelerator.device), reduction="sum").cpu()
    return out


def precomputed_logps(cfg, model, accelerator, seqs, *, pad_id: int, pack_capacity: int | None, split: str) -> torch.Tensor:
    """Reference log-probs of ``seqs`` with the initial model, from ``output_dir``'s cache when it has them.

    The model is still the initial one here (a resumed run loads its checkpoint later, inside the engine), so a
    cache miss recomputes the same values; the cache saves the pass when a run is restarted or resumed.
    """
    key = f"{split}-{fingerprint(cfg, [s.input_ids for s in seqs])}"
    cached = load_cached(cfg.output_dir, key)
    if cached is not None and cached.shape[0] == len(seqs):
        if accelerator.is_main_process:
            print(f"reference log-probs ({split}): reusing {Path(cfg.output_dir) / CACHE_FILE}", flush=True)
        return cached
    values = compute_logps(model, seqs, pad_id=pad_id, pack_capacity=pack_capacity, batch_size=cfg.batch_size * 2,
                           accelerator=accelerator, chunk_size=cfg.loss_chunk_size,
                           desc=f"reference log-probs ({split})")
    if accelerator.is_main_process:
        from safetensors.torch import load_file

        path = Path(cfg.output_dir) / CACHE_FILE
        existing = load_file(str(path)) if path.is_file() else {}
        save_cached(cfg.output_dir, {**{k: v for k, v in existing.items() if not k.startswith(f"{split}-")}, key: values})
    accelerator.wait_for_everyone()
    return values
