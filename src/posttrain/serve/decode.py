"""The serving decode loop: one batch of chat requests, token by token, with per-row sampling and text deltas.

It follows the rollout engine's KV-cache loop (posttrain/rl/rollout.py): left-padded prefill, positions from the
attention mask, and finished rows leave the cache (``Cache.batch_select_indices``). It departs from it in three
ways, because a server's rows are independent requests rather than one RL group:

1. **Per-row sampling.** Each row has its own ``max_tokens``, temperature, top-p and stop strings; greedy rows
   (temperature 0) and sampled rows share a batch.
2. **Text comes out as it is generated.** :class:`TextStream` turns each row's token ids into text deltas: it
   withholds an incomplete UTF-8 character and any tail that could be the start of a stop string, so the deltas
   never contain a stop string and always concatenate to the final text.
3. **Rows can be cancelled** (the client went away): a cancelled row leaves the batch at the next step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from posttrain.rl.rollout import filter_logits


@dataclass
class RowSampling:
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str] = field(default_factory=list)


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "cancelled"
    completion_tokens: int


@dataclass
class Failed:
    message: str


Event = Delta | Finished | Failed


@dataclass
class Job:
    """One chat request on its way through the worker. ``emit`` is called from the worker thread."""

    prompt_ids: list[int]
    sampling: RowSampling
    group: object  # requests of the same group (adapter) may share a batch
    emit: Callable[[Event], None]
    lease: object = None  # what the registry releases when the job ends
    cancelled: threading.Event = field(default_factory=threading.Event)


class TextStream:
    """Incremental detokenization of one row (module point 2)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; returns (text safe to emit now, whether a stop string ended the row)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # the token ends inside a multi-byte character: wait for the rest
            return "", False
        hits = [i for i in (text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            return self._take(text, min(hits)), True
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._take(text, len(text) - held), False

    def flush(self) -> str:
        """The withheld tail, once the row has ended without a stop string."""
        return self._take(self.tokenizer.decode(self.ids, skip_special_tokens=True), None)

    def _take(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        piece = text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece


def _sample(logits: torch.Tensor, rows: list[RowSampling], generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from (R, V) logits, each row with its own temperature and top-p. -> (R,)"""
    chosen = logits.argmax(-1)
    sampled = [k for k, s in enumerate(rows) if s.temperature > 0]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        temperature = torch.tensor([rows[k].temperature for k in sampled], device=logits.device)
        scaled = logits[index] / temperature[:, None]  # (S, V)
        for top_p in {rows[k].top_p for k in sampled} - {1.0}:
            part = torch.tensor([i for i, k in enumerate(sampled) if rows[k].top_p == top_p], device=logits.device)
            scaled[part] = filter_logits(scaled[part], 0, top_p)
        draws = torch.multinomial(scaled.softmax(-1), 1, generator=generator).squeeze(-1)
        chosen[index] = draws
    return chosen


def _forward(model, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float()  # (R, V)


def decode_batch(model, tokenizer, jobs: list[Job], eos_ids: list[int], generator: torch.Generator | None) -> None:
    """Generate every job's completion, emitting :class:`Delta` events as text becomes final and one
    :class:`Finished` per job. The caller has put the model in eval mode and selected the adapter."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    width = max(len(j.prompt_ids) for j in jobs)
    ids = torch.tensor([[pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs], device=device)  # (B, T)
    mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs], device=device)
    cache = DynamicCache(config=getattr(model, "config", None))
    with torch.inference_mode():
        logits = _forward(model, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache)
        next_pos = mask.sum(-1)  # (R,) position of each live row's next token
        alive = list(range(len(jobs)))  # job index of each live cache row
        streams = [TextStream(tokenizer, j.sampling.stop) for j in jobs]
        eos = set(eos_ids)
        while True:
            chosen = _sample(logits, [jobs[r].sampling for r in alive], generator).tolist()
            keep = []
            for k, (r, token) in enumerate(zip(alive, chosen, strict=True)):
                job, stream = jobs[r], streams[r]
                finish = None
                if token in eos:
                    stream.ids.append(token)
                    piece, finish = stream.flush(), "stop"
                else:
                    piece, stopped = stream.push(token)
                    if stopped:
                        finish = "stop"
                    elif len(stream.ids) >= job.sampling.max_tokens:
                        piece, finish = piece + stream.flush(), "length"
                    elif job.cancelled.is_set():
                        finish = "cancelled"
                if piece:
                    job.emit(Delta(piece))
                if finish:
                    job.emit(Finished(finish, len(stream.ids)))
                else:
                    keep.append(k)
            if not keep:
                return
            step_ids = torch.tensor([chosen[k] for k in keep], device=device)
            if len(keep) < len(alive):  # finished rows leave the batch
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, next_pos = mask[index], next_pos[index]
                alive = [alive[k] for k in keep]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            logits = _forward(model, step_ids[:, None], mask, next_pos[:, None], cache)
            next_pos = next_pos + 1
