"""The serving decode loop: one batch of chat requests, token by token, with per-row sampling and text deltas.

It follows the rollout engine's KV-cache loop (posttrain/rl/rollout.py): left-padded prefill, positions from the
attention mask, and finished rows leave the cache (``Cache.batch_select_indices``). It departs from it in three
ways, because a server's rows are independent requests rather than one RL group:

1. **Per-row sampling.** Each row has its own ``max_tokens``, temperature, top-p and stop strings; greedy rows
   (temperature 0) and sampled rows share a batch. Numerically degenerate settings cannot poison a batch: a
   temperature below :data:`GREEDY_BELOW` is greedy (it is greedy in the limit, and dividing by it overflows),
   logits are shifted by their row maximum before the division, and top-p always keeps the most likely token.
2. **Text comes out as it is generated, in linear time.** :class:`TextStream` turns each row's token ids into text
   deltas by decoding only a window of the last tokens (the incremental detokenisation of vLLM and TGI: the
   previous token is decoded again as context, so a SentencePiece word's leading space survives), and matches
   stop strings with one Knuth-Morris-Pratt automaton per string, fed each new character once. It withholds an
   incomplete UTF-8 character and any tail that could be the start of a stop string (the automata's states say
   how long), so the deltas never contain a stop string and always concatenate to the final text. The cost per
   token is constant in the length of the text so far and of the stop strings.
3. **Rows fail alone and can be cancelled.** A row whose logits are not finite, or whose text handling raises,
   fails its own request only; a cancelled row (the client went away) leaves the batch at the next step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from posttrain.models.forward import cache_kwarg
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
    status: int = 500  # the HTTP status a non-streamed request answers with


GREEDY_BELOW = 1e-5  # temperatures below this are greedy (module point 1)


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


class StopMatcher:
    """Knuth-Morris-Pratt over characters: finds ``stop`` in a text fed one character at a time, in amortised O(1)
    per character. ``state`` is the length of the longest prefix of ``stop`` the text so far ends with."""

    def __init__(self, stop: str):
        self.stop, self.state = stop, 0
        self.fail = [0] * len(stop)  # fail[i]: the longest proper border of stop[: i + 1]
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fail[i] = k

    def feed(self, ch: str) -> bool:
        """Advance by one character; True when the text now ends with the whole stop string."""
        while self.state and self.stop[self.state] != ch:
            self.state = self.fail[self.state - 1]
        if self.stop[self.state] == ch:
            self.state += 1
        if self.state == len(self.stop):
            self.state = self.fail[-1]
            return True
        return False


class TextStream:
    """Incremental detokenization and stop matching of one row (module point 2)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.matchers = [StopMatcher(s) for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # the decoded text so far
        self.sent = 0  # characters of it already emitted
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] is the decoded context of the next window
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _window(self, final: bool) -> str:
        """The text the ids since ``read_offset`` add, or "" while they end inside a character (unless ``final``)."""
        context = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(context) or (full.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(context) :]

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; returns (text safe to emit now, whether a stop string ended the row)."""
        self.ids.append(token_id)
        piece = self._window(final=False)
        start = len(self.text)
        self.text += piece
        for i, ch in enumerate(piece, start):
            for m in self.matchers:
                if m.feed(ch):
                    return self._take(i + 1 - len(m.stop)), True
        held = max((m.state for m in self.matchers), default=0)
        return self._take(len(self.text) - held), False

    def flush(self) -> str:
        """The withheld tail, once the row has ended without a stop string."""
        self.text += self._window(final=True)
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece


def _sample(logits: torch.Tensor, rows: list[RowSampling],
            generator: torch.Generator | None) -> tuple[torch.Tensor, list[int]]:
    """One token per row from (R, V) logits, each row with its own temperature and top-p (module point 1).
    -> (tokens (R,), rows whose logits were not finite: they fail alone)"""
    finite = ~torch.isnan(logits).any(-1) & (logits != float("inf")).all(-1) & torch.isfinite(logits).any(-1)
    bad = (~finite).nonzero().flatten().tolist()
    logits = torch.where(finite[:, None], logits, torch.zeros_like(logits))  # placeholders, discarded
    chosen = logits.argmax(-1)
    sampled = [k for k, s in enumerate(rows) if s.temperature >= GREEDY_BELOW and k not in bad]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        temperature = torch.tensor([rows[k].temperature for k in sampled], device=logits.device)
        part_logits = logits[index]
        scaled = (part_logits - part_logits.max(-1, keepdim=True).values) / temperature[:, None]  # (S, V), <= 0
        for top_p in {rows[k].top_p for k in sampled} - {1.0}:
            part = torch.tensor([i for i, k in enumerate(sampled) if rows[k].top_p == top_p], device=logits.device)
            scaled[part] = filter_logits(scaled[part], 0, top_p)
        draws = torch.multinomial(scaled.softmax(-1), 1, generator=generator).squeeze(-1)
        chosen[index] = draws
    return chosen, bad


def _forward(model, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=1, **{cache_kwarg(): cache})
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
            chosen, bad = _sample(logits, [jobs[r].sampling for r in alive], generator)
            chosen = chosen.tolist()
            keep = []
            for k, (r, token) in enumerate(zip(alive, chosen, strict=True)):
                job, stream = jobs[r], streams[r]
                if k in bad:
                    job.emit(Failed("generation failed: the model's next-token scores for this request were not "
                                    "finite (NaN or infinite)"))
                    continue
                finish = None
                try:
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
                except Exception as e:  # this row's text handling: fail this request only
                    job.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))
                    continue
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
