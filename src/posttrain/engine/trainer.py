"""The training engine: one explicit loop on accelerate, shared by every stage.

A stage supplies an :class:`Objective` (how to count normalisation units in a batch, and the summed
loss of a batch); the engine owns everything else: data order, micro-batching and accumulation,
global normalisation, mixed precision, clipping, the schedule, logging, eval, checkpoints and resume.

Normalisation (torchtitan's rule): every micro-batch's summed loss is divided by the number of units
(loss tokens for SFT) in the WHOLE optimizer step, across micro-batches and processes. DDP averages
gradients over processes, so each process scales its loss by ``world_size`` to turn that average back
into a sum. Then batch 8 x accum 1, batch 2 x accum 4 and 2 processes x batch 4 give the same update.

Data order is a deterministic stream: the concatenation of per-epoch permutations seeded by
``seed + epoch``. Optimizer step k takes stream items [k*G, (k+1)*G) with G = batch x accum x world,
so resume only needs the step number, no example is dropped, and every step is full-sized.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from posttrain.config import to_dict
from posttrain.engine import sharding
from posttrain.engine.checkpoint import (
    begin_checkpoint,
    checkpoint_dir,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    save_rng_state,
    staging_dir,
)
from posttrain.engine.metrics import MetricsLogger, plot_metrics, write_status
from posttrain.errors import ConfigError, TrainingDiverged
from posttrain.models import router
from posttrain.runtime import resolve_mixed_precision

if TYPE_CHECKING:
    from posttrain.commands.base import TrainConfig


class Objective(Protocol):
    """What an offline stage (sft, rm, dpo, kto) plugs into the engine: the summed loss of a batch and the units
    that normalise it. Optional attributes, defaulted by :func:`check_objective`: ``unit`` (what ``count``
    counts, shown as units/s; "tok"), ``perplexity`` (False when the eval loss is not a token NLL; True),
    ``progress_keys`` (metrics shown on the progress bar; none)."""

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Normalisation units in a batch (loss tokens, pairs, ...)."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(summed loss, summed metrics) of a batch; metrics are divided by the step's units when logged."""


class RolloutObjective(Objective, Protocol):
    """What an RL stage (grpo, ppo) plugs in: it makes its own training data every step."""

    updates_per_step: int
    """Optimizer updates every step has (PPO's epochs x minibatches, GRPO's num_iterations)."""

    def rollout(self, model: torch.nn.Module, examples: list[Any], step: int) -> tuple[list[list[dict]], dict[str, float]]:
        """Given this process's share of the step's examples (prompts): the updates, each a list of micro-batches
        (one optimizer step each), and the rollout's metrics (already means). May raise :class:`StopTraining`."""

    def evaluate(self, model: torch.nn.Module, examples: list[Any]) -> dict[str, float]:
        """Held-out metrics (RL evaluates by generating); replaces the eval loss."""

    def state_dict(self) -> dict:
        """JSON-able state kept in checkpoints (the guard monitor's)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s state on resume."""


ROLLOUT_MEMBERS = ("updates_per_step", "rollout", "evaluate", "state_dict", "load_state_dict")


@dataclass(frozen=True)
class Plugged:
    """An objective as :meth:`Engine.fit` uses it: checked once, optional attributes resolved."""

    objective: Any
    rollouts: bool
    unit: str
    perplexity: bool
    progress_keys: tuple[str, ...]
    updates_per_step: int


def check_objective(objective: Any) -> Plugged:
    """Check ``objective`` against :class:`Objective`, or :class:`RolloutObjective` when it has any rollout
    member (then it must have all of them); a missing member is a programming error, raised as TypeError."""
    name = type(objective).__name__
    missing = [m for m in ("count", "loss") if not callable(getattr(objective, m, None))]
    rollouts = any(hasattr(objective, m) for m in ROLLOUT_MEMBERS)
    if rollouts:
        missing += [m for m in ROLLOUT_MEMBERS if not hasattr(objective, m)]
    if missing:
        kind = "RolloutObjective" if rollouts else "Objective"
        raise TypeError(f"{name} is not an engine {kind}: it lacks {', '.join(missing)}")
    updates = int(getattr(objective, "updates_per_step", 1))
    if updates < 1:
        raise TypeError(f"{name}.updates_per_step must be >= 1, got {updates}")
    return Plugged(objective, rollouts, getattr(objective, "unit", "tok"), bool(getattr(objective, "perplexity", True)),
                   tuple(getattr(objective, "progress_keys", ())), updates)


def means(sums: dict[str, float], units: float) -> dict[str, float]:
    """Summed metrics -> means. Each is divided by the step's units, except ``<group>/<name>`` when a
    ``count/<name>`` metric exists: that one is divided by its own count (e.g. KTO's mean reward of the
    desirable completions only), so a mean is never diluted by examples it does not cover."""
    out = {}
    for k, v in sums.items():
        if k in ("loss_sum", "tokens"):
            continue
        own = sums.get(f"count/{k.split('/', 1)[1]}") if "/" in k and not k.startswith("count/") else None
        out[k] = v / own if own else (float("nan") if own == 0 else v / max(units, 1.0))
    return out


class StopTraining(Exception):
    """Raised by an objective to end the run early on purpose (a reward-hacking guard tripped).

    The engine stops before applying the step's updates and returns; nothing is saved as final (the stage
    decides what to keep)."""


def _short(key: str) -> str:
    """Progress-bar label of a metric: ``rewards/accuracy`` -> ``accuracy``, ``length/mean`` -> ``length``."""
    return key.split("/")[0] if key.endswith("/mean") else key.split("/")[-1]


class _Diverged(Exception):
    def __init__(self, loss: float):
        self.loss = loss


class DataStream:
    """Deterministic example order: concatenated per-epoch permutations (see module docstring)."""

    def __init__(self, num_examples: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = num_examples, seed, shuffle
        self._cache: dict[int, np.ndarray] = {}

    def _epoch(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if self.shuffle:
                self._cache = {epoch: np.random.default_rng(self.seed + epoch).permutation(self.n)}
            else:
                self._cache = {epoch: np.arange(self.n)}
        return self._cache[epoch]

    def take(self, start: int, count: int) -> list[int]:
        out = []
        for pos in range(start, start + count):
            epoch, offset = divmod(pos, self.n)
            out.append(int(self._epoch(epoch)[offset]))
        return out


@dataclass
class FitResult:
    steps: int
    final_train_loss: float
    stopped: str | None = None  # why the run ended early (StopTraining), None when it completed
    eval_metrics: dict[str, float] = field(default_factory=dict)
    tokens_seen: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Weight decay on matrices only: biases, norms and 1-D parameters are not regularised.
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError(f"method {cfg.method}: the model has no trainable parameters")
    try:
        # fused: one kernel per dtype/device group, updating in place. On the 2-core CPU it stepped 135M fp32
        # params in 0.04-0.05 s against foreach's 0.29-0.31 s and allocated no temporaries (foreach: two of the
        # largest tensor, 216 MB for SmolLM2's embedding); on CUDA foreach also allocates a sqrt(v) buffer of
        # all trainable params, fused does not. Results equal foreach's to float rounding (2e-8 after 3 steps).
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    warmup = int(round(cfg.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def follow_schedule(optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Set every param group's lr to what ``scheduler``'s own schedule gives at its restored position.

    A restored optimizer carries the lr the SAVED run's schedule set last; when the resumed run has another
    horizon (a finished run extended with a larger max_steps or epochs), its schedule differs, and without this the
    first resumed step would train at the old schedule's value (0.0 at the end of a cosine). With the same horizon
    it rewrites the values already there, so exact resume is untouched. One rule, then: on resume, step k trains
    at the lr the current run's schedule gives step k."""
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


class Engine:
    """Runs :meth:`fit` for one stage. Construct, then call ``fit(objective)``."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: torch.nn.Module,
        train_examples: Sequence[Any],
        collate: Callable[[list[Any]], dict[str, torch.Tensor]],
        eval_examples: Sequence[Any] | None = None,
        accelerator=None,
    ):
        from accelerate import Accelerator

        self.cfg = cfg
        self.accelerator = accelerator or Accelerator(
            cpu=not torch.cuda.is_available(), mixed_precision=resolve_mixed_precision(cfg.precision)
        )
        self.model = model
        self.train_examples = train_examples
        self.eval_examples = eval_examples
        self.collate = collate
        self.output_dir = Path(cfg.output_dir)
        self._objective = None
        acc = self.accelerator
        self.world = acc.num_processes
        self.rank = acc.process_index
        self.sharded = sharding.resolve(cfg) == "fsdp"
        if self.sharded:
            sharding.ensure_process_group(acc.device)
        self.global_batch = cfg.batch_size * cfg.grad_accum * self.world
        if cfg.max_steps > 0:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = max(1, math.ceil(cfg.epochs * len(train_examples) / self.global_batch))

    # ------------------------------------------------------------------------------------------ helpers
    def _sum_across(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        if self.world > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return t.tolist()

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def _micro_batches(self, stream: DataStream, step: int) -> list[dict[str, torch.Tensor]]:
        cfg = self.cfg
        indices = stream.take(step * self.global_batch, self.global_batch)
        per_rank = cfg.batch_size * cfg.grad_accum
        mine = indices[self.rank * per_rank : (self.rank + 1) * per_rank]
        return [
            self.collate([self.train_examples[i] for i in mine[m * cfg.batch_size : (m + 1) * cfg.batch_size]])
            for m in range(cfg.grad_accum)
        ]

    @torch.no_grad()
    def evaluate(self, objective: Objective) -> dict[str, float]:
        """Loss over the whole eval set (sharded over processes), as a units-weighted mean; a rollout objective's
        own evaluation instead."""
        if not self.eval_examples:
            return {}
        model = self.model
        plugged = check_objective(objective)
        if plugged.rollouts:
            return objective.evaluate(model, self.eval_examples)
        model.eval()
        mine = list(range(self.rank, len(self.eval_examples), self.world))
        sums: dict[str, float] = {}
        units = 0.0
        bs = self.cfg.batch_size
        batches = math.ceil(len(mine) / bs)
        if self.sharded:  # every process runs as many forwards (each gathers layers with the others)
            batches = math.ceil(math.ceil(len(self.eval_examples) / self.world) / bs)
        for b in range(batches):
            chunk = mine[b * bs : (b + 1) * bs]
            batch = self._to_device(self.collate([self.eval_examples[i] for i in (chunk or [0])]))
            with self.accelerator.autocast():
                loss_sum, metrics = objective.loss(model, batch)
            if not chunk:  # a stand-in batch that kept this process in step with the others: not counted
                continue
            units += objective.count(batch)
            for k, v in {"loss": loss_sum, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        keys = sorted(sums)
        totals = self._sum_across([units] + [sums[k] for k in keys])
        units, values = totals[0], dict(zip(keys, totals[1:]))
        model.train()
        out = means(values, units)
        if "loss" in out and plugged.perplexity:
            out["perplexity"] = math.exp(min(out["loss"], 50.0))
        out["units"] = units
        return out

    def _save(self, step: int, optimizer, scheduler, tokens_seen: int) -> Path:
        acc = self.accelerator
        unwrapped = acc.unwrap_model(self.model)
        state = {"step": step, "tokens_seen": tokens_seen, "total_steps": self.total_steps,
                 "world_size": self.world, "global_batch": self.global_batch}
        if self._objective is not None and self._objective.rollouts:
            state["objective"] = self._objective.objective.state_dict()
        path = None
        if self.sharded:  # every process writes its shards into the main process's staging directory
            if acc.is_main_process:
                begin_checkpoint(self.output_dir, step)
            acc.wait_for_everyone()
            sharding.save_sharded(staging_dir(self.output_dir, step), self.model, optimizer)
            acc.wait_for_everyone()
        if acc.is_main_process:
            path = save_checkpoint(
                self.output_dir, step, model=unwrapped, optimizer=optimizer, scheduler=scheduler,
                trainer_state=state, keep_last=self.cfg.keep_last, rank=self.rank, sharded=self.sharded,
            )
        acc.wait_for_everyone()
        if not acc.is_main_process:
            path = checkpoint_dir(self.output_dir, step)
            save_rng_state(path, self.rank)
        acc.wait_for_everyone()
        return path

    # ------------------------------------------------------------------------------------------ the loop
    def _step_examples(self, stream: DataStream, step: int) -> list[Any]:
        """This process's share of step ``step``'s examples (for objectives that roll out)."""
        indices = stream.take(step * self.global_batch, self.global_batch)
        per_rank = self.cfg.batch_size * self.cfg.grad_accum
        return [self.train_examples[i] for i in indices[self.rank * per_rank : (self.rank + 1) * per_rank]]

    def _step_updates(self, plugged: Plugged, stream: DataStream, step: int) -> tuple[list[list[dict]], dict[str, float]]:
        """Step ``step``'s updates (lists of micro-batches, on the device) and its rollout metrics: the stream's
        micro-batches for an offline objective, or what a rollout objective makes from the step's examples."""
        if not plugged.rollouts:
            return [[self._to_device(b) for b in self._micro_batches(stream, step)]], {}
        updates, metrics = plugged.objective.rollout(self.model, self._step_examples(stream, step), step)
        keys = sorted(metrics)
        if self.world > 1 and keys:  # every process rolled out as many prompts: mean of means
            metrics = {k: v / self.world for k, v in zip(keys, self._sum_across([metrics[k] for k in keys]))}
        return [[self._to_device(b) for b in u] for u in updates], metrics

    def _update(self, objective: Objective, micro: list[dict[str, torch.Tensor]], params, optimizer, scheduler):
        """One optimizer step over ``micro`` (globally normalised, see module docstring).
        Returns (loss, summed metrics, units, grad_norm, lr), or raises TrainingDiverged before touching weights."""
        cfg, acc = self.cfg, self.accelerator
        local_units = sum(objective.count(b) for b in micro)
        (global_units,) = self._sum_across([local_units])
        sums: dict[str, float] = {}
        for m, batch in enumerate(micro):
            # Gradients are all-reduced only on the last micro-batch of the step.
            last = m == len(micro) - 1
            if self.sharded:
                sharding.require_gradient_sync(self.model, last)
                sync = nullcontext()
            else:
                sync = acc.no_sync(self.model) if not last else nullcontext()
            with sync:
                with acc.autocast(), router.collecting() as router_losses:
                    loss_sum, metrics = objective.loss(self.model, batch)
                scaled = loss_sum * (self.world / max(global_units, 1.0))
                if router_losses:  # an MoE model trained with its load-balancing loss (models/router.py)
                    aux = torch.stack(router_losses).sum()
                    scaled = scaled + aux / len(micro)
                    metrics = {**metrics, "router_aux": aux.detach() * objective.count(batch)}
                acc.backward(scaled)
            for k, v in {"loss": loss_sum, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        keys = sorted(sums)
        totals = dict(zip(keys, self._sum_across([sums[k] for k in keys])))
        loss = totals["loss"] / max(global_units, 1.0)
        if not math.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            raise _Diverged(loss)
        grad_norm = None
        if cfg.max_grad_norm > 0:
            if self.sharded:  # DTensor gradients: torch's clip takes the norm over all shards (a collective)
                grad_norm = float(sharding.full_tensor(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)))
            else:
                grad_norm = float(acc.clip_grad_norm_(params, cfg.max_grad_norm))
        optimizer.step()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss, totals, global_units, grad_norm, lr

    def fit(self, objective: Objective, on_step: Callable[[int, dict], None] | None = None) -> FitResult:
        cfg, acc = self.cfg, self.accelerator
        plugged = self._objective = check_objective(objective)
        updates_per_step = plugged.updates_per_step
        if self.sharded:  # before the optimizer exists: it must hold the sharded parameters
            sharding.shard(self.model, cfg)
        raw_optimizer = build_optimizer(self.model, cfg)
        scheduler = build_scheduler(raw_optimizer, cfg, self.total_steps * updates_per_step)
        stream = DataStream(len(self.train_examples), cfg.seed)

        start_step, tokens_seen = 0, 0
        resume_from = resolve_resume(self.output_dir, cfg.resume)
        if resume_from is not None:
            state = load_checkpoint(resume_from, model=self.model, optimizer=raw_optimizer, scheduler=scheduler, rank=self.rank)
            if state.get("global_batch", self.global_batch) != self.global_batch:
                raise ConfigError(
                    f"resume: {resume_from} was written with a global batch of {state['global_batch']} sequences "
                    f"(batch_size x grad_accum x processes) but this run has {self.global_batch}; "
                    "the data position would not line up. Use the same batch settings."
                )
            start_step, tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
            if start_step > self.total_steps:
                raise ConfigError(
                    f"resume: {resume_from} is at step {start_step}, past this run's {self.total_steps} steps; "
                    "raise max_steps (or epochs) to continue it, or set resume=false to start over"
                )
            follow_schedule(raw_optimizer, scheduler)
            if "objective" in state and plugged.rollouts:
                objective.load_state_dict(state["objective"])
            if acc.is_main_process:
                saved_total = int(state.get("total_steps", self.total_steps))
                horizon = (f"; the run was planned for {saved_total} steps, the lr now follows the {self.total_steps}-step "
                           "schedule" if saved_total != self.total_steps else "")
                print(f"resumed from {resume_from} at step {start_step}{horizon}")

        if self.sharded:
            optimizer = raw_optimizer
        else:
            self.model, optimizer = acc.prepare(self.model, raw_optimizer)
        self.model.train()
        logger = MetricsLogger(self.output_dir, acc.is_main_process, cfg.tensorboard, resume_step=start_step)
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "posttrain_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
            (self.output_dir / "run.json").unlink(missing_ok=True)
            write_status(self.output_dir, status="running", objective=type(objective).__name__,
                         total_steps=self.total_steps, start_step=start_step, started=time.time(), pid=os.getpid(),
                         host=socket.gethostname(), processes=acc.num_processes)

        params = [p for p in self.model.parameters() if p.requires_grad]
        bar = tqdm(total=self.total_steps, initial=start_step, disable=not acc.is_main_process,
                   desc=f"{type(objective).__name__}", unit="step", dynamic_ncols=True)
        result = FitResult(steps=start_step, final_train_loss=float("nan"), tokens_seen=tokens_seen)
        t_start = time.perf_counter()
        window_tokens, window_t0 = 0, time.perf_counter()
        last_saved: Path | None = resume_from

        for step in range(start_step, self.total_steps):
            t_step = time.perf_counter()
            try:
                updates, rollout_metrics = self._step_updates(plugged, stream, step)
            except StopTraining as stop:
                result.stopped = str(stop)
                result.steps = step
                bar.write(f"stopped at step {step + 1}: {stop}")
                break
            record: dict[str, float] = {}
            losses, step_units = [], 0.0
            try:
                for micro in updates:
                    loss, totals, global_units, grad_norm, lr = self._update(objective, micro, params, optimizer, scheduler)
                    losses.append(loss)
                    step_units = global_units  # units of one update (every update covers the same data)
                    for k, v in means(totals, global_units).items():
                        if k != "loss":
                            record[k] = record.get(k, 0.0) + v / len(updates)
                    if grad_norm is not None:
                        record["grad_norm"] = record.get("grad_norm", 0.0) + grad_norm / len(updates)
            except _Diverged as d:
                bar.close()
                logger.close()
                if acc.is_main_process:
                    write_status(self.output_dir, status="diverged", step=step, ended=time.time())
                kept = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint had been saved yet"
                raise TrainingDiverged(
                    f"loss became {d.loss} at step {step + 1}; stopped before updating the weights, {kept}. "
                    "Lower lr, check the data, or use precision=fp32."
                ) from None
            loss = sum(losses) / len(losses)

            done = step + 1
            tokens_seen += int(step_units)
            window_tokens += int(step_units)
            record = {"loss": loss, "lr": lr, "units": step_units, **rollout_metrics, **record}
            record["step_seconds"] = time.perf_counter() - t_step
            if "rollout/seconds" in record:  # the share of the step spent generating
                record["rollout/share"] = record["rollout/seconds"] / max(record["step_seconds"], 1e-9)
            result.history.append({"step": done, **record})
            result.final_train_loss = loss
            if done % cfg.log_every == 0 or done == self.total_steps:
                now = time.perf_counter()
                record["units_per_s"] = window_tokens / max(now - window_t0, 1e-9)
                window_tokens, window_t0 = 0, now
                record["epoch"] = done * self.global_batch / len(self.train_examples)
                logger.log(done, record)
                shown = {"loss": f"{loss:.4f}"}
                shown.update({_short(k): f"{record[k]:.3f}" for k in plugged.progress_keys if k in record})
                shown.update({"lr": f"{lr:.2e}", f"{plugged.unit}/s": f"{record['units_per_s']:.1f}"})
                bar.set_postfix(shown)
            if on_step is not None:
                on_step(done, record)
            bar.update(1)
            if cfg.eval_every and done % cfg.eval_every == 0 and done != self.total_steps:
                ev = self.evaluate(objective)
                if ev:
                    logger.log(done, ev, prefix="eval")
                    result.history[-1].update({f"eval/{k}": v for k, v in ev.items()})
                    if "loss" in ev:
                        bar.write(f"step {done}: eval loss {ev['loss']:.4f}")
            if cfg.save_every and done % cfg.save_every == 0 and done != self.total_steps:
                last_saved = self._save(done, raw_optimizer, scheduler, tokens_seen)
        else:
            result.steps = self.total_steps

        bar.close()
        result.tokens_seen = tokens_seen
        result.seconds = time.perf_counter() - t_start
        if start_step < self.total_steps and result.stopped is None:
            result.eval_metrics = self.evaluate(objective)
            if result.eval_metrics:
                logger.log(self.total_steps, result.eval_metrics, prefix="eval")
            self._save(self.total_steps, raw_optimizer, scheduler, tokens_seen)
        logger.close()
        if acc.is_main_process:
            plot_metrics(self.output_dir)
            write_status(self.output_dir, status="stopped" if result.stopped else "finished", step=result.steps,
                         ended=time.time(), **({"reason": result.stopped} if result.stopped else {}))
        self.model = acc.unwrap_model(self.model)
        return result
