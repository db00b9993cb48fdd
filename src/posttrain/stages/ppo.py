"""PPO with a value head (classic RLHF): a reward model (or any reward source) scores whole completions, a
per-token KL penalty keeps the policy near the reference, GAE turns it into per-token advantages, and several
clipped epochs are run over each rollout batch.

Composed from shared parts: the engine (``ppo_epochs x num_minibatches`` optimizer updates per step, the unit
being completion tokens), the rollout objective (:mod:`posttrain.rl.objective`), the pure losses
(:func:`~posttrain.losses.gae`, :func:`~posttrain.losses.ppo_loss`, :func:`~posttrain.losses.whiten`) and the
reference strategies.

The value head is a linear layer on the policy's final hidden states (one backbone, one forward for policy and
value), trained with the policy's optimizer. It is saved next to the adapter/model as ``value_head.safetensors``
and is not part of the PEFT adapter or the transformers model, which load as usual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from posttrain.engine.sharding import full_tensor
from posttrain.losses import IGNORE_INDEX, gae, ppo_loss, whiten
from posttrain.models.forward import _causal_lm, target_logps_and_values
from posttrain.models.loading import unwrap
from posttrain.models.reference import eval_mode
from posttrain.rl.objective import RLObjective, flat_order
from posttrain.rl.run import RLResult, finish_rl, fit_rl, objective_parts, setup_rl

if TYPE_CHECKING:
    from posttrain.commands.ppo import PPOConfig

VALUE_HEAD_FILE = "value_head.safetensors"


def attach_value_head(model: torch.nn.Module) -> torch.nn.Linear:
    """A zero-initialised H -> 1 head registered on the causal LM (so the optimizer and checkpoints see it)."""
    lm = _causal_lm(model)
    head = torch.nn.Linear(lm.config.hidden_size, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    head.to(next(p for p in lm.parameters()).device)
    lm.value_head = head
    return head


def detach_value_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    lm = _causal_lm(unwrap(model))
    head = getattr(lm, "value_head", None)
    if head is not None:
        del lm.value_head
    return head


def padded(flat: torch.Tensor, batch: dict[str, torch.Tensor], lengths: list[int]) -> torch.Tensor:
    """Flat (N,) completion-token values (``target_logps`` order) -> (S, L) per sequence, zero padded."""
    out = torch.zeros(len(lengths), max(lengths), dtype=flat.dtype)
    pos = 0
    for i in flat_order(batch):
        out[i, : lengths[i]] = flat[pos : pos + lengths[i]]
        pos += lengths[i]
    return out


def flatten(values: torch.Tensor, batch: dict[str, torch.Tensor], lengths: list[int]) -> torch.Tensor:
    return torch.cat([values[i, : lengths[i]] for i in flat_order(batch)])


class PPOObjective(RLObjective):
    unit = "tok"

    def __init__(self, cfg: PPOConfig, value_head: torch.nn.Linear, **kw):
        super().__init__(cfg, **kw)
        self.value_head = value_head
        self.updates_per_step = cfg.ppo_epochs * cfg.num_minibatches

    def build_updates(self, model, examples, completions, totals, step):
        cfg = self.cfg
        temperature = self.sampling.temperature or 1.0
        scores = whiten(totals, shift_mean=False) if cfg.whiten_rewards and totals.numel() > 1 else totals
        inner = unwrap(model)
        micro, kl_tokens, per_micro = [], [], []
        for sl in self.micro_slices(len(examples)):
            batch = self.collate_slice(model, examples, completions, sl)
            dev = self.to_device(batch)
            with torch.no_grad(), eval_mode(inner), self.accelerator.autocast():
                old, _, values = target_logps_and_values(inner, dev, cfg.loss_chunk_size, temperature, self.value_head)
            ref = self.reference_logps(model, dev)
            kl_tokens.append(self.kl_of(dev, completions[sl], ref))
            old, values, ref = old.float().cpu(), values.float().cpu(), ref.cpu()
            lengths = [len(c.token_ids) for c in completions[sl]]
            rewards = torch.zeros(len(lengths), max(lengths))
            if cfg.kl_in == "reward":
                rewards -= cfg.kl_coef * padded(old - ref, batch, lengths)
            for i, n in enumerate(lengths):
                rewards[i, n - 1] += scores[sl][i]
            mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
            adv, returns = gae(rewards, padded(values, batch, lengths), mask, gamma=cfg.gamma, lam=cfg.lam)
            batch.update(old_logps=old, old_values=values, ref_logps=ref,
                         returns=flatten(returns, batch, lengths))
            self.attach_behaviour(batch, completions[sl])
            per_micro.append((batch, flatten(adv, batch, lengths)))
        all_adv = torch.cat([a for _, a in per_micro])
        mean, std = all_adv.mean(), all_adv.std(unbiased=False)
        for batch, adv in per_micro:
            batch["advantages"] = (adv - mean) / (std + 1e-8) if cfg.whiten_advantages and all_adv.numel() > 1 else adv
            micro.append(batch)
        return self.schedule(micro, step), kl_tokens

    def schedule(self, micro: list[dict], step: int) -> list[list[dict]]:
        """ppo_epochs passes; each pass shuffles the micro-batches (seeded by step) into num_minibatches updates."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(cfg.seed * 31 + step)
        per = len(micro) // cfg.num_minibatches
        updates = []
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(micro), generator=g).tolist()
            updates.extend([[micro[i] for i in order[k * per : (k + 1) * per]] for k in range(cfg.num_minibatches)])
        return updates

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss(self, model, batch: dict[str, torch.Tensor]):
        cfg = self.cfg
        logps, _, values = target_logps_and_values(model, batch, cfg.loss_chunk_size, self.sampling.temperature or 1.0, self.value_head)
        loss, metrics = ppo_loss(
            logps, batch["old_logps"].to(logps.dtype), batch["advantages"].to(logps.dtype), values,
            batch["old_values"].to(values.dtype), batch["returns"].to(values.dtype), clip_range=cfg.clip_range,
            value_clip_range=cfg.value_clip_range, value_coef=cfg.value_coef, ref_logps=batch["ref_logps"].to(logps.dtype),
            kl_coef=cfg.kl_coef if cfg.kl_in == "loss" else 0.0, **self.correction_kwargs(batch, logps.dtype),
        )
        metrics["values"] = values.detach().sum()
        metrics["update/kl"] = metrics.pop("kl")  # "kl" is the rollout's (before the update), which guards watch
        return loss, metrics


def train(cfg: PPOConfig) -> RLResult:
    from safetensors.torch import save_file

    s = setup_rl(cfg)
    value_head = attach_value_head(s.model)
    objective = PPOObjective(cfg, value_head, **objective_parts(s))
    engine, fit = fit_rl(cfg, s, objective, f"{cfg.ppo_epochs} epochs x {cfg.num_minibatches} minibatches, "
                                            f"kl_coef {cfg.kl_coef} in the {cfg.kl_in}")
    head = detach_value_head(engine.model)
    # whole on every process (a collective under FSDP, so before the main process saves alone)
    head_state = {k: full_tensor(v).detach().cpu().contiguous() for k, v in head.state_dict().items()}

    def save_head(out):
        save_file(head_state, str(out / VALUE_HEAD_FILE))

    return finish_rl(cfg, s, engine, fit, objective, "ppo", extra_save=save_head)
