"""Preference data: pairs (``prompt``/``chosen``/``rejected``) and unpaired feedback (``prompt``/``completion``/``label``).

Formats follow TRL's conventions, validated and tokenized through the SFT path (:func:`normalize_prompt_completion`,
:func:`tokenize_sft`), so a pair's chosen sequence is exactly the SFT example ``prompt`` + ``chosen`` would be:

- explicit prompt, plain text: ``{"prompt": str, "chosen": str, "rejected": str}``;
- explicit prompt, conversational: ``prompt`` a message list, ``chosen``/``rejected`` lists of assistant messages;
- implicit prompt: ``chosen`` and ``rejected`` are whole conversations (message lists) without ``prompt``; the
  prompt is their longest common prefix of messages, and what follows must be assistant turns;
- unpaired (KTO): ``prompt`` + ``completion`` (strings or message lists) + ``label`` (JSON ``true``/``false``).

Rows that cannot teach a preference are invalid and named by line: chosen identical to rejected, an empty
side, a missing prompt, a non-boolean label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.data.batching import collate_sequences
from posttrain.data.dataset import DataReport, load_rows
from posttrain.data.formats import SFTExample, normalize_prompt_completion
from posttrain.data.tokenize import TokenizedExample, tokenize_sft


@dataclass
class PairExample:
    """A tokenized preference pair; ``ref_*`` are the reference model's summed log-probs once precomputed."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    ref_chosen: float | None = None
    ref_rejected: float | None = None


@dataclass
class UnpairedExample:
    """A tokenized completion with a thumbs up (``desirable``) or down; ``ref`` as in :class:`PairExample`."""

    sequence: TokenizedExample
    desirable: bool
    ref: float | None = None
    kl_sequence: TokenizedExample | None = None  # this prompt + the next row's completion (KL estimate)
    ref_kl: float | None = None  # reference log-prob of ``kl_sequence``

    @property
    def prompt_length(self) -> int:
        """Tokens before the first target: the prompt (the part a mismatched completion is appended to)."""
        return self.sequence.loss_mask.index(1)


# ------------------------------------------------------------------------------------------ validation
def normalize_pair(row: dict) -> tuple[SFTExample, SFTExample]:
    """Validate a preference row; return (prompt + chosen, prompt + rejected) as SFT examples."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None:
            columns = ", ".join(repr(k) for k in row) or "none"
            raise ValueError(f"missing field: '{name}' (a preference row has prompt, chosen, rejected; row has {columns})")
    prompt = row.get("prompt")
    if prompt is None:
        if isinstance(chosen, list) and isinstance(rejected, list):
            prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected)
        else:
            raise ValueError("missing field: 'prompt' (needed unless chosen and rejected are whole conversations)")
    if chosen == rejected:
        raise ValueError("chosen and rejected are identical, so the row states no preference")
    return (normalize_prompt_completion(prompt, chosen, "chosen"),
            normalize_prompt_completion(prompt, rejected, "rejected"))


def _split_implicit_prompt(chosen: list, rejected: list) -> tuple[list, list, list]:
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise ValueError("chosen and rejected are identical, so the row states no preference")
    if shared == 0:
        raise ValueError("chosen/rejected: conversations share no prompt turns; give a 'prompt' field")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def normalize_unpaired(row: dict) -> tuple[SFTExample, bool]:
    """Validate a KTO row; return (prompt + completion, desirable)."""
    prompt, completion, label = row.get("prompt"), row.get("completion"), row.get("label")
    if prompt is None:
        raise ValueError("missing field: 'prompt' (a KTO row has prompt, completion, label)")
    if completion is None:
        raise ValueError("missing field: 'completion' (a KTO row has prompt, completion, label)")
    if label is None:
        raise ValueError("missing field: 'label' (true for a desirable completion, false for an undesirable one)")
    if not isinstance(label, bool):
        raise ValueError(f"label: expected true or false, got {label!r}")
    return normalize_prompt_completion(prompt, completion), label


# ------------------------------------------------------------------------------------------ loading
def _identical_after_fit(sequences: list[TokenizedExample]) -> str | None:
    chosen, rejected = sequences
    if chosen.input_ids == rejected.input_ids:
        return "chosen and rejected identical after truncation to max_length"
    return None


def load_pair_dataset(path: str | Path, tokenizer: PreTrainedTokenizerBase, *, max_length: int,
                      overflow: str = "truncate", skip_invalid: bool = False) -> tuple[list[PairExample], DataReport]:
    """Every row of ``path`` validated and tokenized as a pair; bad rows listed by line (or skipped and counted)."""

    def convert(data: dict):
        chosen, rejected = normalize_pair(data)
        return [tokenize_sft(chosen, tokenizer), tokenize_sft(rejected, tokenizer)], None

    rows, report = load_rows(path, convert, max_length=max_length, overflow=overflow, skip_invalid=skip_invalid,
                             check_fitted=_identical_after_fit)
    return [PairExample(seqs[0], seqs[1]) for seqs, _ in rows], report


def load_unpaired_dataset(path: str | Path, tokenizer: PreTrainedTokenizerBase, *, max_length: int,
                          overflow: str = "truncate", skip_invalid: bool = False) -> tuple[list[UnpairedExample], DataReport]:
    """Every row of ``path`` validated and tokenized as a labelled completion (KTO)."""

    def convert(data: dict):
        example, desirable = normalize_unpaired(data)
        return [tokenize_sft(example, tokenizer)], desirable

    rows, report = load_rows(path, convert, max_length=max_length, overflow=overflow, skip_invalid=skip_invalid)
    examples = [UnpairedExample(seqs[0], desirable) for seqs, desirable in rows]
    # Fixed partners (row i's prompt, row i+1's completion), so a precomputed reference matches every batch.
    for i, ex in enumerate(examples):
        ex.kl_sequence = splice(ex, examples[(i + 1) % len(examples)], max_length)
    return examples, report


# ------------------------------------------------------------------------------------------ batching

def collate_pairs(pairs: list[PairExample], pad_id: int, pack_capacity: int | None = None) -> dict[str, torch.Tensor]:
    """B pairs -> one batch of 2B sequences: chosen are sequences 0..B-1, rejected B..2B-1.

    Adds ``ref_logps`` (2B,) in the same order when the reference log-probs were precomputed.
    """
    batch = collate_sequences([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, pack_capacity)
    if pairs[0].ref_chosen is not None:
        batch["ref_logps"] = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs],
                                          dtype=torch.float64)
    return batch


def splice(prompt_of: UnpairedExample, completion_of: UnpairedExample, max_length: int) -> TokenizedExample:
    """Prompt tokens of one example + completion tokens of another: an unrelated pair for KTO's KL estimate.

    Token ids are spliced, not re-rendered: the prompt part ends with the template's generation prompt, a
    prefix of every rendering, so the splice is that pair's rendering up to tokenizer merges across the
    boundary (none for chat templates, whose generation prompt ends in a special token or a newline).
    """
    cut_prompt, cut_other = prompt_of.prompt_length, completion_of.prompt_length
    ids = prompt_of.sequence.input_ids[:cut_prompt] + completion_of.sequence.input_ids[cut_other:]
    mask = [0] * cut_prompt + completion_of.sequence.loss_mask[cut_other:]
    return TokenizedExample(ids[:max_length], mask[:max_length])
