"""GRPO (and RLOO): sample a group of completions per prompt, reward them, and push up the better ones.

Composed from shared parts: the engine (one optimizer step per rollout batch, or ``num_iterations`` of them;
the unit is completion tokens or completions, per ``loss_norm``), the rollout objective
(:mod:`posttrain.rl.objective`: sampling, rewards, KL/length/entropy/duplicate guards), the pure losses
(:func:`~posttrain.losses.grpo_loss`, :func:`~posttrain.losses.group_advantages`,
:func:`~posttrain.losses.rloo_advantages`) and the reference strategies (base model by disabling the adapter).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from posttrain.losses import group_advantages, grpo_loss, rloo_advantages
from posttrain.models.forward import target_logps
from posttrain.models.loading import unwrap
from posttrain.models.reference import eval_mode
from posttrain.rl.objective import RLObjective
from posttrain.rl.run import RLResult, finish_rl, fit_rl, objective_parts, setup_rl

if TYPE_CHECKING:
    from posttrain.commands.grpo import GRPOConfig


class GRPOObjective(RLObjective):
    def __init__(self, cfg: GRPOConfig, **kw):
        super().__init__(cfg, **kw)
        self.unit = "tok" if cfg.loss_norm == "token" else "seqs"
        self.updates_per_step = cfg.num_iterations

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
        old = batch.get("old_logps")
        loss, metrics = grpo_loss(
            logps, logps.detach() if old is None else old.to(logps.dtype), batch["advantages"], seq_index,
            int(batch["last_index"].shape[0]), ref_logps=batch["ref_logps"].to(logps.dtype), beta=cfg.beta,
            clip_low=cfg.clip_low, clip_high=cfg.clip_high, norm=cfg.loss_norm,
            **self.correction_kwargs(batch, logps.dtype),
        )
        metrics["update/kl"] = metrics.pop("kl")  # "kl" is the rollout's (before the update), which guards watch
        return loss, metrics


def train(cfg: GRPOConfig) -> RLResult:
    s = setup_rl(cfg)
    objective = GRPOObjective(cfg, **objective_parts(s))
    engine, fit = fit_rl(cfg, s, objective, f"advantage {cfg.advantage}, beta {cfg.beta}, loss_norm {cfg.loss_norm}")
    return finish_rl(cfg, s, engine, fit, objective, "grpo")
