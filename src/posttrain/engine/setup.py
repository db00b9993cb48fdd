"""Setting up and finishing a training run, shared by every stage and by rl/: the accelerator, the tokenizer,
the model, the data, the reference, the final save.

Setup order matters for the user: the tokenizer loads and every data row is validated BEFORE the model
loads, so a bad row costs seconds, not a model load (or hours of training).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from posttrain.methods import can_pack
from posttrain.models.adapters import ParamReport, build_model, is_peft
from posttrain.models.loading import load_tokenizer

if TYPE_CHECKING:
    from posttrain.commands.base import TrainConfig
    from posttrain.engine.trainer import FitResult


@dataclass
class TrainResult:
    """What a training stage returns: where it saved, the engine's fit, and the trained model (unwrapped)."""

    output_dir: Path
    fit: FitResult
    model: torch.nn.Module


@dataclass
class Setup:
    tokenizer: object
    model: torch.nn.Module
    report: ParamReport
    accelerator: object


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    from posttrain.runtime import keep_cpu_heap, resolve_mixed_precision

    # Several runs in one process (tests, the demo) may ask for different precisions: accelerate keeps a
    # process-wide state, so drop it (the distributed PartialState stays).
    AcceleratorState._reset_state()
    from posttrain.engine import sharding

    strategy = sharding.resolve(cfg)  # before any data or model: a bad combination costs nothing
    # cpu=True on CPU-only machines makes accelerate honour torchrun's WORLD_SIZE (gloo DDP).
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=resolve_mixed_precision(cfg.precision))
    if strategy == "fsdp":
        sharding.ensure_process_group(accelerator.device)
    if accelerator.device.type == "cpu":
        keep_cpu_heap()
    set_seed(cfg.seed)
    return accelerator


def parallel(cfg: TrainConfig, accelerator) -> str:
    """How the run is spread, for the line every stage prints before training: '2 process(es), fsdp, precision bf16'."""
    strategy = cfg.distributed.strategy if accelerator.num_processes > 1 or cfg.distributed.strategy == "fsdp" else None
    parts = [f"{accelerator.num_processes} process(es)"] + ([strategy] if strategy else [])
    return ", ".join(parts + [f"precision {accelerator.mixed_precision}"])


def say(accelerator, message: str) -> None:
    if accelerator.is_main_process:
        print(message, flush=True)


def load_tokenizer_for(cfg: TrainConfig):
    return load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)


def build(cfg: TrainConfig, tokenizer, accelerator) -> Setup:
    model, report = build_model(cfg, device=accelerator.device, mixed_precision=accelerator.mixed_precision)
    say(accelerator, report.summary())
    return Setup(tokenizer=tokenizer, model=model, report=report, accelerator=accelerator)


def save_final(model: torch.nn.Module, tokenizer, output_dir: str | Path, accelerator) -> Path:
    """Write the standard artefact: a PEFT adapter directory, or a transformers model directory."""
    from posttrain.engine import sharding

    out = Path(output_dir)
    accelerator.wait_for_everyone()
    main = accelerator.is_main_process
    sharded = sharding.is_sharded(model)
    state = None
    if sharded:  # every process takes part in gathering; the main process writes
        if main:
            out.mkdir(parents=True, exist_ok=True)
        if is_peft(model):  # only the adapter is gathered, not the frozen base
            state = sharding.trainable_state_dict(model, main)
        else:  # the whole model, one tensor at a time (see sharding.save_streaming)
            sharding.save_streaming(model, out / "model.safetensors", main)
    if main:
        model = accelerator.unwrap_model(model)
        model.config.use_cache = True
        if is_peft(model):
            model.save_pretrained(out, state_dict=state)  # adapter_config.json + adapter_model.safetensors
        elif sharded:  # the weights are written: the rest of save_pretrained's directory
            model.config.save_pretrained(out)
            if getattr(model, "generation_config", None) is not None and model.can_generate():
                model.generation_config.save_pretrained(out)
        else:
            model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    accelerator.wait_for_everyone()
    return out


def load_train_eval(cfg: TrainConfig, tokenizer, accelerator, loader):
    """``loader(path, tokenizer, max_length=, overflow=, skip_invalid=)`` on data.train and data.eval, reports printed."""
    kw = dict(max_length=cfg.max_length, overflow=cfg.data.overflow, skip_invalid=cfg.data.skip_invalid)
    train_rows, report = loader(cfg.data.train, tokenizer, **kw)
    say(accelerator, f"train data: {report.summary()}")
    eval_rows = None
    if cfg.data.eval:
        eval_rows, eval_report = loader(cfg.data.eval, tokenizer, **kw)
        say(accelerator, f"eval data: {eval_report.summary()}")
    return train_rows, eval_rows


def pack_capacity(cfg: TrainConfig, accelerator) -> int | None:
    """Row capacity for packing the sequences of a batch together, or None when the method cannot pack."""
    if cfg.packing and can_pack(cfg.method):
        return cfg.max_length
    if cfg.packing:
        say(accelerator, f"packing: off for method {cfg.method} (its virtual tokens would be shared across packed sequences)")
    return None


def finish(engine, fit, tokenizer, cfg: TrainConfig, accelerator, what: str) -> Path:
    """Save the final artefact and print the one-line summary every stage ends with."""
    out = save_final(engine.model, tokenizer, cfg.output_dir, accelerator)
    parts = [f"done: {fit.steps} steps, final train loss {fit.final_train_loss:.4f}"]
    if fit.eval_metrics:
        shown = {k: v for k, v in fit.eval_metrics.items() if k in ("loss", "rewards/accuracy", "accuracy", "rewards/margins", "margin", "reward")}
        parts.append("eval " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    say(accelerator, f"{'; '.join(parts)}; {what} saved to {out}")
    return out


def reference_for(cfg: TrainConfig, model: torch.nn.Module, accelerator, needed: bool = True):
    """The reference strategy for ``model`` (see models/reference.py), announced; the model is put on its device
    when the reference is precomputed (it runs before the engine prepares the model)."""
    from posttrain.engine import sharding
    from posttrain.models.reference import make_reference

    reference = make_reference(model, cfg, needed=needed, device=accelerator.device)
    if reference.kind == "frozen_copy" and cfg.distributed.strategy == "fsdp":
        sharding.shard(reference.frozen, cfg, frozen=True)  # a full-FT reference, sharded too
    say(accelerator, f"reference: {reference.describe()}")
    if reference.kind == "precomputed" and not getattr(model, "is_loaded_in_4bit", False):
        model.to(accelerator.device)
    return reference


def attach_reference_logps(cfg: TrainConfig, model: torch.nn.Module, accelerator, reference, splits: dict[str, list], *,
                           pad_id: int, capacity: int | None, sequences, store) -> None:
    """With a precomputed reference, compute the initial model's log-probs of every split's rows once (cached in
    output_dir): ``sequences(rows)`` lists the rows' sequences, ``store(rows, values)`` keeps the values in them."""
    from posttrain.models.reference import precomputed_logps

    if reference.kind != "precomputed":
        return
    for split, rows in splits.items():
        if rows:
            store(rows, precomputed_logps(cfg, model, accelerator, sequences(rows), pad_id=pad_id,
                                          pack_capacity=capacity, split=split))
