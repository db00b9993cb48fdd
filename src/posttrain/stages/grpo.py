"""GRPO (and RLOO): sample a group of completions per prompt, reward them, and push up the better ones.

Composed from shared parts: the engine (one optimizer step per rollout batch, or ``num_iterations`` of them;
the unit is completion tokens or completions, per ``loss_norm``), the rollout objective
(:mod:`posttrain.rl.objective`: sampling, rewards, KL/length/entropy/duplicate guards), the pure losses
(:func:`~posttrain.losses.grpo_loss`, :func:`~posttrain.losses.group_advantages`,
:func:`~posttrain.losses.rloo_advantages`) and the reference strategies (base model by disabling the adapter).
At ``beta: 0`` the reference pass runs only when the KL is to be measured (``measure_kl``, a guard on it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from posttrain.losses import group_advantages, grpo_loss, rloo_advantages
from posttrain.models.forward import target_logps
from posttrain.models.loading import unwrap
from posttrain.models.reference import eval_mode
from posttrain.rl.guards import parse_rules
from posttrain.rl.objective import RLObjective
from posttrain.rl.run import RLResult, finish_rl, fit_rl, objective_parts, setup_rl

if TYPE_CHECKING:
    from posttrain.commands.grpo import GRPOConfig


def measures_kl(cfg: GRPOConfig) -> bool:
    """Whether the run needs the reference pass: beta > 0 (the loss's KL term), ``measure_kl: always``, or a guard
    rule on ``kl`` / ``kl/trend`` (which would otherwise never be measured)."""
    watched = {rule.metric for rule in parse_rules(cfg.guards.rules)} & {"kl", "kl/trend"}
    return cfg.beta > 0 or cfg.measure_kl == "always" or bool(watched)


class GRPOObjective(RLObjective):
    def __init__(self, cfg: GRPOConfig, **kw):
        super().__init__(cfg, **kw)
        self.unit = "tok" if cfg.loss_norm == "token" else "seqs"
        self.updates_per_step = cfg.num_iterations
        self.with_reference = measures_kl(cfg)
        if not self.with_reference:
            self.progress_keys = tuple(k for k in self.progress_keys if k != "kl")

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.advantage == "rloo":
            return rloo_advantages(rewards, cfg.num_generations)
        return group_advantages(rewards, cfg.num_generations, scale_std=cfg.scale_rewards)

    def build_updates(self, model, examples, completions, totals, step):
        cfg = self.cfg
        adv = self.advantages(totals)
        micro, kl_tokens = [], []
        temperature = self.sampling.temperature or 1.0
        for sl in self.micro_slices(len(examples)):
            batch = self.collate_slice(model, examples, completions, sl)
            batch["advantages"] = adv[sl].clone()
            self.attach_behaviour(batch, completions[sl])
            dev = self.to_device(batch)
            if self.with_reference:
                ref = self.reference_logps(model, dev)
                batch["ref_logps"] = ref.cpu()
                kl_tokens.append(self.kl_of(dev, completions[sl], ref))
            if cfg.num_iterations > 1:  # later updates need the sampling policy's log-probs
                with torch.no_grad(), eval_mode(unwrap(model)), self.accelerator.autocast():
                    batch["old_logps"] = target_logps(unwrap(model), dev, cfg.loss_chunk_size, temperature)[0].float().cpu()
            micro.append(batch)
        return [micro] * cfg.num_iterations, kl_tokens

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        if self.cfg.loss_norm == "token":
            return int((batch["labels"][:, 1:] != -100).sum())
        return int(batch["last_index"].shape[0])

    def loss(self, model, batch: dict[str, torch.Tensor]):
        cfg = self.cfg
        logps, predicts = target_logps(model, batch, cfg.loss_chunk_size, self.sampling.temperature or 1.0)
        seq_index = batch["sequence_ids"][predicts]
        old, ref = batch.get("old_logps"), batch.get("ref_logps")
        loss, metrics = grpo_loss(
            logps, logps.detach() if old is None else old.to(logps.dtype), batch["advantages"], seq_index,
            int(batch["last_index"].shape[0]), ref_logps=None if ref is None else ref.to(logps.dtype), beta=cfg.beta,
            clip_low=cfg.clip_low, clip_high=cfg.clip_high, norm=cfg.loss_norm,
            **self.correction_kwargs(batch, logps.dtype),
        )
        kl = metrics.pop("kl")  # "kl" is the rollout's (before the update), which guards watch
        if ref is not None:
            metrics["update/kl"] = kl
        return loss, metrics


def train(cfg: GRPOConfig) -> RLResult:
    s = setup_rl(cfg, needs_reference=measures_kl(cfg))
    objective = GRPOObjective(cfg, **objective_parts(s))
    engine, fit = fit_rl(cfg, s, objective, f"advantage {cfg.advantage}, beta {cfg.beta}, loss_norm {cfg.loss_norm}")
    return finish_rl(cfg, s, engine, fit, objective, "grpo")
