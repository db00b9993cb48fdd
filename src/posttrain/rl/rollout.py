"""The rollout engine: ``generate(prompts, n, sampling) -> completions`` with token ids and log-probs.

One interface for every RL stage (:class:`RolloutSampler`). The transformers backend runs its own batched
decoding loop with a KV cache instead of ``model.generate`` because RL needs three things generate does not do
cheaply:

1. **Log-probs and entropy of every sampled token**, from the same logits that were sampled from, without a
   second forward pass (``generate(output_scores=True)`` returns the *processed* scores, after top-k/top-p).
2. **Shared prompt prefill.** Each prompt is prefilled once and its KV cache repeated ``n`` times
   (``Cache.batch_repeat_interleave``), so a group of 8 samples costs one prompt forward, not 8.
3. **Finished rows leave the batch.** When a completion hits EOS or a stop string its row is dropped from the
   KV cache (``Cache.batch_select_indices``), so later decoding steps only pay for live rows; ``generate``
   keeps computing padded rows until the longest completion ends.

Sampling: logits / temperature, then top-k, then top-p (nucleus), then a draw. The draw is seeded by the caller,
so a rollout is reproducible (resume depends on it): either one ``torch.Generator`` for the call, or one seed per
prompt (``seeds``), which makes each prompt's completions independent of which prompts share its batch, and so
of how many processes split the step (RL stages use seeds: 1 and 2 processes sample the same rollouts). With
seeds, each sample row draws its uniforms u_t up front and takes the token where the cumulative distribution
first exceeds u_t (inverse-CDF sampling: the same distribution as ``torch.multinomial``). ``temperature == 0`` is
greedy. ``logprob`` is log softmax(logits / temperature) of the drawn token, before top-k/top-p truncation:
the distribution the training loss evaluates (at temperature 1 that is the policy itself). ``entropy`` is that
distribution's entropy at the step, a reward-hacking signal (collapse to a few phrases drives it to 0).

The policy generates with its LoRA adapter applied, in eval mode, without gradients; on a CPU its fp32 LoRA
layers decode through weights merged once per rollout (``W + s B A``, copies: the trained weights are never
modified; :func:`posttrain.models.fused_lora.merged_for_decoding`). Prompt and
prefix tuning are not supported by RL stages (their virtual tokens need the base model's generate path).
``sample_logprobs`` is the log-prob of the drawn token under the distribution actually sampled from (after
top-k/top-p, renormalised): the behaviour policy of the importance-sampling correction. The vLLM engine
(``rollout.engine=vllm``) is :mod:`posttrain.rl.vllm_rollout`, with the same interface.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from posttrain.errors import ConfigError
from posttrain.models import fused_lora
from posttrain.models.forward import cache_kwarg


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"sampling.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"sampling.top_k: must be >= 0 (0 = off), got {self.top_k}")


@dataclass
class Completion:
    prompt_index: int  # which prompt of the call
    token_ids: list[int]  # generated ids, including the EOS or the token that completed a stop string
    logprobs: list[float]  # per generated token (see module docstring)
    entropy: list[float]  # per generated token
    text: str  # decoded, special tokens skipped, cut before a stop string
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    # log q(token) under the distribution actually sampled from (after temperature, top-k and top-p; 0.0 for greedy):
    # the behaviour policy of the importance-sampling correction (losses.rollout_is_weights)
    sample_logprobs: list[float] | None = None


@dataclass
class RolloutStats:
    seconds: float = 0.0
    tokens: int = 0
    forward_passes: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf. (R, V) -> (R, V).

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p``; the most likely
    token is always kept."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop_sorted[..., 0] = False  # the most likely token, also when top_p rounds to 0 in the logits' dtype
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "module", model)
    if getattr(inner, "peft_config", None) is not None and inner.active_peft_config.is_prompt_learning:
        raise ConfigError("RL stages support full, lora and qlora; prompt/prefix tuning cannot generate rollouts here")
    return inner


class RolloutSampler:
    """Samples completions from a causal LM (or a PeftModel with LoRA) with the transformers backend."""

    engine_name = "builtin"
    sync_seconds = 0.0  # this engine never syncs (see sync)
    syncs = 0

    def __init__(self, tokenizer, *, prompts_per_batch: int = 16, eos_token_ids: list[int] | None = None):
        if tokenizer.pad_token_id is None:
            raise ConfigError("the tokenizer has no pad token: set tokenizer.pad_token (e.g. to the EOS token)")
        self.tokenizer = tokenizer
        self.prompts_per_batch = prompts_per_batch
        eos = eos_token_ids if eos_token_ids is not None else [tokenizer.eos_token_id]
        self.eos_ids = sorted({int(e) for e in eos if e is not None})
        self.stats = RolloutStats()

    def sync(self, model: torch.nn.Module, step: int | None) -> None:
        """Nothing to do: this engine samples from the training model itself."""

    def close(self) -> None:
        pass

    def generate(self, model: torch.nn.Module, prompt_ids: list[list[int]], n: int, sampling: Sampling,
                 generator: torch.Generator | None = None, seeds: list[int] | None = None) -> list[Completion]:
        """``n`` completions per prompt, grouped: completions ``i*n .. i*n+n-1`` answer prompt i. ``seeds``: one
        per prompt (instead of ``generator``), see the module docstring."""
        if seeds is not None and len(seeds) != len(prompt_ids):
            raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
        model = _causal_lm(model)
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        out: list[Completion | None] = [None] * (len(prompt_ids) * n)
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
        try:
            with torch.no_grad(), fused_lora.merged_for_decoding(model):
                for start in range(0, len(order), self.prompts_per_batch):
                    chunk = order[start : start + self.prompts_per_batch]
                    uniforms = None
                    if seeds is not None and sampling.temperature != 0:
                        uniforms = torch.cat([torch.rand(n, sampling.max_new_tokens, dtype=torch.float64,
                                                         generator=torch.Generator().manual_seed(seeds[i]))
                                              for i in chunk])
                    batch = self._generate_batch(model, [prompt_ids[i] for i in chunk], n, sampling, generator, uniforms)
                    for j, c in enumerate(batch):
                        p = chunk[j // n]
                        c.prompt_index = p
                        out[p * n + j % n] = c
        finally:
            model.train(was_training)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.tokens += sum(len(c.token_ids) for c in out)
        return out  # type: ignore[return-value]

    def _forward(self, model, input_ids, attention_mask, position_ids, cache):
        self.stats.forward_passes += 1
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=True, logits_to_keep=1, **{cache_kwarg(): cache})
        return out.logits[:, -1].float(), cache

    def _generate_batch(self, model, prompts: list[list[int]], n: int, sampling: Sampling,
                        generator: torch.Generator | None, uniforms: torch.Tensor | None = None) -> list[Completion]:
        from transformers import DynamicCache

        device = next(model.parameters()).device
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=getattr(model, "config", None))
        logits, cache = self._forward(model, ids, mask, positions, cache)
        if n > 1:  # one prefill per prompt, its cache shared by the n samples
            cache.batch_repeat_interleave(n)
            logits, mask = logits.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        rows = logits.shape[0]
        next_pos = mask.sum(-1)  # (R,) position of the next token
        alive = torch.arange(rows, device=device)  # original row of each live cache row
        tokens: list[list[int]] = [[] for _ in range(rows)]
        logps: list[list[float]] = [[] for _ in range(rows)]
        qlogps: list[list[float]] = [[] for _ in range(rows)]
        ents: list[list[float]] = [[] for _ in range(rows)]
        finish = ["length"] * rows
        eos = torch.tensor(self.eos_ids, device=device)
        stops = [s for s in sampling.stop if s]
        tail = max((len(s) for s in stops), default=0) + 8  # tokens re-decoded to look for a stop string

        for step in range(sampling.max_new_tokens):
            if sampling.temperature == 0:
                scaled = logits
                chosen = logits.argmax(-1)
                chosen_q = torch.zeros(chosen.shape, device=chosen.device)  # a point mass: log 1
            else:
                scaled = logits / sampling.temperature
                filtered = filter_logits(scaled, sampling.top_k, sampling.top_p)
                probs = filtered.softmax(-1)
                if uniforms is None:
                    chosen = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
                else:
                    cdf = probs.double().cumsum(-1)
                    u = uniforms[alive.cpu(), step].to(cdf.device)[:, None] * cdf[:, -1:]
                    chosen = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
                truncated = sampling.top_k or sampling.top_p < 1.0
                chosen_q = filtered.log_softmax(-1).gather(-1, chosen[:, None]).squeeze(-1) if truncated else None
            logp_all = scaled.log_softmax(-1)
            chosen_logp = logp_all.gather(-1, chosen[:, None]).squeeze(-1)
            if chosen_q is None:  # nothing truncated: the sampling distribution is the temperature-scaled policy
                chosen_q = chosen_logp
            entropy = -(logp_all.exp() * logp_all.nan_to_num(neginf=0.0)).sum(-1)
            done = torch.isin(chosen, eos)
            for k, (r, t, lp, q, en) in enumerate(zip(alive.tolist(), chosen.tolist(), chosen_logp.tolist(), chosen_q.tolist(),
                                                      entropy.tolist(), strict=True)):
                tokens[r].append(t)
                logps[r].append(lp)
                qlogps[r].append(q)
                ents[r].append(en)
                if bool(done[k]):
                    finish[r] = "stop"
                elif stops:
                    text = self.tokenizer.decode(tokens[r][-tail:], skip_special_tokens=True)
                    if any(s in text for s in stops):
                        finish[r] = "stop"
                        done[k] = True
            if step == sampling.max_new_tokens - 1:
                break
            keep = (~done).nonzero().squeeze(-1)
            if keep.numel() == 0:
                break
            if keep.numel() < alive.numel():  # finished rows leave the batch
                cache.batch_select_indices(keep)
                alive, chosen, mask, next_pos = alive[keep], chosen[keep], mask[keep], next_pos[keep]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            logits, cache = self._forward(model, chosen[:, None], mask, next_pos[:, None], cache)
            next_pos = next_pos + 1

        out = []
        for r in range(rows):
            text = self.tokenizer.decode(tokens[r], skip_special_tokens=True)
            if finish[r] == "stop" and stops:
                cut = min((text.find(s) for s in stops if s in text), default=-1)
                if cut >= 0:
                    text = text[:cut]
            out.append(Completion(r // n, tokens[r], logps[r], ents[r], text.strip(), finish[r], qlogps[r]))
        return out


def sequence_entropy(c: Completion) -> float:
    return sum(c.entropy) / max(len(c.entropy), 1)


def completion_logps_reference(model: torch.nn.Module, prompt: list[int], completion: list[int], temperature: float = 1.0) -> torch.Tensor:
    """Log-probs of ``completion`` after ``prompt`` from one plain forward pass (no cache): the ground truth the
    rollout engine's log-probs are tested against."""
    ids = torch.tensor([prompt + completion], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / (temperature or 1.0)
    return F.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None]).squeeze(-1)
