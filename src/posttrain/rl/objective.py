"""What every RL stage shares, plugged into the one training engine as an objective that rolls out.

Per engine step (``rollout``), for this process's prompts:

1. **Sample** ``num_generations`` completions per prompt with the rollout engine, seeded per prompt by (seed,
   step, the prompt's index in the step's global batch): the same step always samples the same completions from
   the same weights, which is what makes a resumed run repeat an uninterrupted one, and a 2-process run sample
   what a 1-process run does. Under FSDP the policy is gathered whole for the rollout (engine/sharding.py).
2. **Score** them with the weighted reward sources (each source logged as ``reward/<name>``).
3. **Measure** the reward-hacking signals: KL to the reference (k3, from the rollout's own log-probs and one
   no-gradient reference pass), mean length, token entropy, the share of duplicate completions within groups,
   the share cut by ``max_new_tokens``; every ``guards.every`` steps the held-out reward and the guard rewards on
   ``data.eval`` prompts (never optimised), and ``guard/gap`` = held-out reward - guard total.
4. **Guard**: the monitor's rules may warn or stop (:class:`~posttrain.engine.trainer.StopTraining`). A policy
   whose rollout passed every guard is remembered (its trainable weights, on CPU) so a stop can keep it.
5. **Build** the stage's micro-batches (the stage adds advantages and whatever its loss needs).

Sequences are ``prompt ids + generated ids`` exactly as sampled (never re-tokenized), packed per micro-batch.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING

import torch

from posttrain.data.groups import collate_groups
from posttrain.data.preference import collate_sequences
from posttrain.data.tokenize import TokenizedExample
from posttrain.engine import sharding
from posttrain.engine.trainer import StopTraining
from posttrain.losses import k3_kl
from posttrain.models.forward import target_logps, uses_varlen_attention
from posttrain.models.loading import unwrap
from posttrain.models.reference import Reference
from posttrain.rewards.registry import RewardSet
from posttrain.rl.rollout import Completion, RolloutSampler, Sampling

if TYPE_CHECKING:
    from posttrain.commands.base import RLConfig
    from posttrain.data.prompts import PromptExample
    from posttrain.rl.guards import GuardMonitor


def flat_order(batch: dict[str, torch.Tensor]) -> list[int]:
    """Sequences in the order their target tokens appear in ``target_logps``'s flat (N,) output."""
    from posttrain.losses import IGNORE_INDEX, shift_labels

    predicts = shift_labels(batch["labels"]) != IGNORE_INDEX
    which = batch["sequence_ids"][predicts]
    return torch.unique_consecutive(which).tolist()


def flatten_per_sequence(batch: dict[str, torch.Tensor], values: list[list[float]]) -> torch.Tensor:
    """Per-sequence token values (in completion order) laid out like ``target_logps``'s flat output."""
    return torch.tensor([v for i in flat_order(batch) for v in values[i]], dtype=torch.float32)


class RLObjective:  # an engine.trainer.RolloutObjective
    """Base of the GRPO and PPO objectives (see the module docstring). Subclasses implement ``build_updates``,
    ``count`` and ``loss``."""

    perplexity = False
    progress_keys = ("reward", "kl", "length/mean")

    def __init__(self, cfg: RLConfig, *, tokenizer, reference: Reference, rewards: RewardSet,
                 guard_rewards: RewardSet | None, monitor: GuardMonitor, capacity: int | None, accelerator,
                 eval_examples: list[PromptExample] | None = None, eos_ids: list[int] | None = None, sampler=None):
        self.cfg, self.tokenizer, self.reference = cfg, tokenizer, reference
        self.rewards, self.guard_rewards, self.monitor = rewards, guard_rewards, monitor
        self.capacity, self.accelerator = capacity, accelerator
        self.eval_examples = eval_examples or []
        self.sampling = Sampling(**vars(cfg.sampling))
        # the built-in engine, or the one setup_rl built (rl/vllm_rollout.py); both sample with RolloutSampler's contract
        self.sampler = sampler or RolloutSampler(tokenizer, prompts_per_batch=cfg.rollout_batch_size, eos_token_ids=eos_ids)
        self.correction = cfg.rollout.resolved_correction()
        # the behaviour log-probs go into the micro-batches when they are corrected for or differ from the trainer's
        self.with_behaviour = self.correction != "none" or self.sampler.engine_name != "builtin"
        self.good: tuple[int, dict[str, torch.Tensor]] | None = None  # (step, trainable weights) of the last passing policy
        self.warned: set[tuple[int, str]] = set()

    # ------------------------------------------------------------------------------------------ sampling
    def seeds(self, step: int, indices: list[int], salt: int = 0) -> list[int]:
        """One sampling seed per prompt, from (seed, step, the prompt's index in the step's global batch, salt):
        a prompt samples the same completions however many processes split the step."""
        return [(self.cfg.seed * 1_000_003 + step * 7919 + i * 104_729 + salt * 15_485_863) % (2**63) for i in indices]

    def sample(self, model, examples: list[PromptExample], step: int) -> list[Completion]:
        first = self.accelerator.process_index * len(examples)  # the engine gives each process a contiguous share
        with sharding.gathered(model):
            self.sampler.sync(unwrap(model), step)
            return self.sampler.generate(unwrap(model), [e.prompt_ids for e in examples], self.cfg.num_generations,
                                         self.sampling, seeds=self.seeds(step, list(range(first, first + len(examples)))))

    def score(self, rewards: RewardSet, examples: list[PromptExample], completions: list[Completion]):
        prompts = [examples[c.prompt_index].prompt for c in completions]
        rows = [examples[c.prompt_index].row for c in completions]
        totals, per_source = rewards.score(prompts, [c.text for c in completions], rows)
        return torch.tensor(totals, dtype=torch.float32), per_source

    def sequences(self, examples: list[PromptExample], completions: list[Completion]) -> list[TokenizedExample]:
        out = []
        for c in completions:
            prompt = examples[c.prompt_index].prompt_ids
            out.append(TokenizedExample(prompt + c.token_ids, [0] * len(prompt) + [1] * len(c.token_ids)))
        return out

    def micro_slices(self, num_prompts: int) -> list[slice]:
        """Completion index ranges of the micro-batches: ``batch_size`` prompts x ``num_generations`` each."""
        per = self.cfg.batch_size * self.cfg.num_generations
        return [slice(s, s + per) for s in range(0, num_prompts * self.cfg.num_generations, per)]

    def collate(self, seqs: list[TokenizedExample]) -> dict[str, torch.Tensor]:
        return collate_sequences(seqs, self.tokenizer.pad_token_id, self.capacity)

    def collate_slice(self, model, examples: list[PromptExample], completions: list[Completion], sl: slice) -> dict[str, torch.Tensor]:
        """The micro-batch of completions ``sl`` (whole groups): shared prompts (data.groups) when possible."""
        if self.cfg.share_prompt and not uses_varlen_attention(model):
            n = self.cfg.num_generations
            part = completions[sl]
            groups = [(examples[part[g].prompt_index].prompt_ids, [c.token_ids for c in part[g : g + n]])
                      for g in range(0, len(part), n)]
            return collate_groups(groups, self.tokenizer.pad_token_id, 0 if self.capacity else None)
        return self.collate(self.sequences(examples, completions[sl]))

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    @torch.no_grad()
    def reference_logps(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N,) reference log-probs of the batch's completion tokens (same temperature as sampling)."""
        temperature = self.sampling.temperature or 1.0
        with self.accelerator.autocast():
            return self.reference(model, batch, lambda m, b: target_logps(m, b, self.cfg.loss_chunk_size, temperature)[0]).float()

    # ------------------------------------------------------------------------------------------ metrics
    def rollout_metrics(self, completions: list[Completion], totals: torch.Tensor, per_source: dict, kl_tokens: list[torch.Tensor]) -> dict[str, float]:
        n = self.cfg.num_generations
        lengths = [len(c.token_ids) for c in completions]
        tokens = max(sum(lengths), 1)
        metrics = RewardSet.metrics("reward", totals.tolist(), per_source)
        if n > 1:
            metrics["reward/group_std"] = float(totals.reshape(-1, n).std(dim=1).mean())
        metrics["length/mean"] = sum(lengths) / len(lengths)
        metrics["length/truncated"] = sum(c.finish_reason == "length" for c in completions) / len(completions)
        metrics["entropy"] = sum(sum(c.entropy) for c in completions) / tokens
        if n > 1:
            dup = 0
            for g in range(0, len(completions), n):
                counts = Counter(c.text for c in completions[g : g + n])
                dup += sum(k - 1 for k in counts.values())
            metrics["duplicates/share"] = dup / len(completions)
        if kl_tokens:
            kl = torch.cat(kl_tokens)
            metrics["kl"] = float(kl.mean()) if kl.numel() else 0.0
        metrics["rollout/seconds"] = self._rollout_seconds
        if self.sampler.engine_name != "builtin":
            metrics["rollout/sync_seconds"] = self.sampler.sync_seconds
        metrics["rollout/tokens_per_s"] = sum(lengths) / max(self._rollout_seconds, 1e-9)
        return metrics

    def attach_behaviour(self, batch: dict[str, torch.Tensor], completions: list[Completion]) -> None:
        """The rollout engine's sampling log-probs, in flat order, for the importance-sampling correction."""
        if self.with_behaviour:
            batch["behaviour_logps"] = flatten_per_sequence(batch, [c.sample_logprobs for c in completions])

    def correction_kwargs(self, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
        """The loss's keyword arguments for the correction (none without behaviour log-probs)."""
        if "behaviour_logps" not in batch:
            return {}
        return dict(behaviour_logps=batch["behaviour_logps"].to(dtype), correction=self.correction,
                    correction_cap=self.cfg.rollout.correction_cap)

    def kl_of(self, batch: dict[str, torch.Tensor], completions: list[Completion], ref: torch.Tensor) -> torch.Tensor:
        """Per-token k3 KL of the rollout's own log-probs against the reference's, in flat order."""
        rollout = flatten_per_sequence(batch, [c.logprobs for c in completions]).to(ref.device)
        return k3_kl(rollout, ref).clamp(min=0).cpu()  # k3 >= 0; float noise gives -1e-10 at a start where pi = pi_ref

    @torch.no_grad()
    def heldout(self, model, step: int | None) -> dict[str, float]:
        """Held-out reward (each source) and guard rewards on the eval prompts, decoded with eval settings."""
        if not self.eval_examples:
            return {}
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        mine = self.eval_examples[rank::world]
        sampling = Sampling(max_new_tokens=self.sampling.max_new_tokens, temperature=self.cfg.eval_temperature,
                            top_p=self.sampling.top_p, top_k=self.sampling.top_k, stop=list(self.sampling.stop))
        n = self.cfg.eval_num_generations
        with sharding.gathered(model):
            self.sampler.sync(unwrap(model), step)
            completions = self.sampler.generate(unwrap(model), [e.prompt_ids for e in mine], n, sampling,
                                                seeds=self.seeds(step or 0, list(range(rank, len(self.eval_examples), world)), salt=1))
        totals, per_source = self.score(self.rewards, mine, completions)
        out = RewardSet.metrics("heldout/reward", totals.tolist(), per_source)
        out["heldout/length"] = sum(len(c.token_ids) for c in completions) / max(len(completions), 1)
        if self.guard_rewards is not None:
            g_totals, g_per = self.score(self.guard_rewards, mine, completions)
            guard = RewardSet.metrics("guard", g_totals.tolist(), g_per)
            out.update(guard)
            out["guard/gap"] = out["heldout/reward"] - guard["guard"]
        return self.mean_across(out)

    def mean_across(self, metrics: dict[str, float]) -> dict[str, float]:
        """Mean of each metric over processes (each rolled out as many prompts); keys are the same on every process."""
        world = self.accelerator.num_processes
        if world == 1:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        t = self.accelerator.reduce(t, reduction="sum") / world
        return dict(zip(keys, t.tolist()))

    def evaluate(self, model, examples) -> dict[str, float]:
        return {k.removeprefix("heldout/"): v for k, v in self.heldout(model, None).items()}

    # ------------------------------------------------------------------------------------------ guards
    def check_guards(self, model, step: int, metrics: dict[str, float]) -> None:
        done = step + 1
        events = self.monitor.observe(done, metrics)
        metrics["guards/fired"] = float(len(self.monitor.events))  # warnings and stops so far (charted by `posttrain ui`)
        if self.accelerator.is_main_process:
            for e in events:
                if e.action == "warn":
                    print(f"guard warning: {e.message}", flush=True)
        if self.monitor.stopped is not None:
            raise StopTraining(self.monitor.stopped.message)
        if self.cfg.guards.keep_good and self.monitor.last_passing_step == done:
            inner = unwrap(model)
            self.good = (step, {k: p.detach().to("cpu", copy=True) for k, p in inner.named_parameters() if p.requires_grad})

    # ------------------------------------------------------------------------------------------ engine hooks
    def rollout(self, model, examples: list[PromptExample], step: int):
        t0 = time.perf_counter()
        syncs = self.sampler.syncs
        completions = self.sample(model, examples, step)
        self._rollout_seconds = time.perf_counter() - t0
        if self.sampler.syncs != syncs:  # generation alone; the sync is logged apart
            self._rollout_seconds -= self.sampler.sync_seconds
        totals, per_source = self.score(self.rewards, examples, completions)
        updates, kl_tokens = self.build_updates(model, examples, completions, totals, step)
        # Every process must see the same metrics before the guards decide (else one could stop alone and hang the rest).
        metrics = self.mean_across(self.rollout_metrics(completions, totals, per_source, kl_tokens))
        every = self.cfg.guards.every
        if every and step % every == 0:
            metrics.update(self.heldout(model, step))
        self.check_guards(model, step, metrics)
        return updates, metrics

    def build_updates(self, model, examples, completions, totals, step):  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"monitor": self.monitor.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "monitor" in state:
            self.monitor.load_state_dict(state["monitor"])
