"""Load an SFT data file into tokenized examples, with a report of every row that did not make it.

Every row is validated before anything is returned: a bad row anywhere raises one
:class:`~posttrain.errors.DataError` listing the first few bad rows and the total, so the user fixes
them in one pass instead of one per run. With ``skip_invalid`` bad rows are dropped instead, and
counted by reason. No row is ever lost silently: each one read ends up kept or counted in
:class:`DataReport` under exactly one reason.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from posttrain.data.formats import normalize_sft
from posttrain.data.io import Record, read_records
from posttrain.data.tokenize import LOSS_ON, ChatTemplateError, TokenizedExample, tokenize_sft_turns
from posttrain.errors import DataError

OVERFLOW = ("truncate", "drop")
MAX_LISTED_ERRORS = 10
PROGRESS_MIN_ROWS = 2000  # below this tokenizing takes about a second; a bar would only be noise


@dataclass
class DataReport:
    """What happened to each row read: ``rows_read == rows_kept + rows_invalid + every drop count``."""

    source: str  # the path as the user gave it
    max_length: int
    rows_read: int = 0
    rows_kept: int = 0
    invalid_reasons: Counter[str] = field(default_factory=Counter)  # reason -> rows skipped for it
    rows_truncated: int = 0  # kept, cut to max_length
    rows_dropped_too_long: int = 0  # overflow="drop"
    rows_dropped_no_loss: int = 0  # no target token left (truncation cut every assistant token)
    dropped_reasons: Counter[str] = field(default_factory=Counter)  # other drops after fitting, by reason
    tokens: int = 0  # in kept rows, after truncation
    loss_tokens: int = 0
    prompts_only: bool = False  # RL prompt data: nothing in it is trained on, so the summary does not say so
    examples_from_turns: int = 0  # SFT: examples made from rows split per assistant turn (data/tokenize.py)

    @property
    def rows_invalid(self) -> int:
        return sum(self.invalid_reasons.values())

    def summary(self) -> str:
        """One paragraph for the log: what was kept, and why everything else was not."""
        share = f"{100 * self.loss_tokens / self.tokens:.1f}%" if self.tokens else "0%"
        trained = "" if self.prompts_only else f", {share} of them trained on"
        parts = [f"{self.source}: read {_rows(self.rows_read)}, kept {self.rows_kept:,} ({self.tokens:,} tokens{trained})."]
        if self.rows_invalid:
            top = "; ".join(f"{n:,} × {reason}" for reason, n in self.invalid_reasons.most_common(5))
            others = len(self.invalid_reasons) - 5
            more = f"; and {others} other reason{'s' * (others != 1)}" if others > 0 else ""
            parts.append(f"Skipped {_rows(self.rows_invalid)} as invalid ({top}{more}).")
        if self.rows_truncated:
            parts.append(f"Truncated {_rows(self.rows_truncated)} to {self.max_length:,} tokens.")
        if self.rows_dropped_too_long:
            parts.append(
                f"Dropped {_rows(self.rows_dropped_too_long)} longer than {self.max_length:,} tokens."
            )
        if self.rows_dropped_no_loss:
            parts.append(
                f"Dropped {_rows(self.rows_dropped_no_loss)} left with no trained tokens after truncation."
            )
        for reason, n in self.dropped_reasons.most_common():
            parts.append(f"Dropped {_rows(n)}: {reason}.")
        if self.examples_from_turns:
            parts.append(f"{self.examples_from_turns:,} examples come from conversations split per assistant turn "
                         "(the chat template rewrites earlier turns, e.g. drops their reasoning; each turn is "
                         "trained as the last one, as inference renders it).")
        return " ".join(parts)


def load_sft_dataset(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    overflow: str = "truncate",
    skip_invalid: bool = False,
    loss_on: str = "completion",
) -> tuple[list[TokenizedExample], DataReport]:
    """Read, validate and tokenize every row of ``path``; see the module docstring for the guarantees.

    ``overflow`` says what happens to a row longer than ``max_length`` tokens: ``"truncate"`` keeps
    its first ``max_length`` tokens, ``"drop"`` drops it.
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on: expected one of {', '.join(LOSS_ON)}, got {loss_on!r}")

    def convert(data: dict) -> tuple[list[TokenizedExample], None]:
        return tokenize_sft_turns(normalize_sft(data), tokenizer, loss_on), None

    rows, report = load_rows(path, convert, max_length=max_length, overflow=overflow, skip_invalid=skip_invalid)
    examples = [seq for seqs, _ in rows for seq in seqs]
    report.examples_from_turns = sum(len(seqs) for seqs, _ in rows if len(seqs) > 1)
    return examples, report


Converter = Callable[[dict], tuple[list[TokenizedExample], Any]]
Check = Callable[[list[TokenizedExample]], "str | None"]


def load_rows(
    path: str | Path,
    convert: Converter,
    *,
    max_length: int,
    overflow: str = "truncate",
    skip_invalid: bool = False,
    check_fitted: Check | None = None,
) -> tuple[list[tuple[list[TokenizedExample], Any]], DataReport]:
    """The loader every data format shares: read, convert, fit to ``max_length``, report.

    ``convert(row)`` validates one raw row and returns its token sequences (one for SFT, chosen and
    rejected for a preference pair) plus anything else the caller keeps (a KTO label); it raises
    ``ValueError``/``ChatTemplateError`` naming the bad field. Every sequence of a row is fitted to
    ``max_length`` (truncated or the row dropped); a row any of whose sequences is left with no target
    token is dropped; then ``check_fitted(sequences)`` may name one more reason to drop the row (a pair
    whose two sides became identical when truncated). Everything dropped is counted in the report.
    """
    if max_length < 1:
        raise ValueError(f"max_length: expected a positive number of tokens, got {max_length}")
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow: expected one of {', '.join(OVERFLOW)}, got {overflow!r}")

    report = DataReport(source=os.fspath(path), max_length=max_length)
    records = list(read_records(path))  # materialised so the progress bar knows the total
    report.rows_read = len(records)
    bad_rows: list[tuple[str, str]] = []  # (where, reason)
    kept: list[tuple[list[TokenizedExample], Any]] = []
    progress = tqdm(
        records, desc=f"tokenizing {report.source}", unit="row", disable=len(records) <= PROGRESS_MIN_ROWS
    )
    for record in progress:
        converted, reason = _convert_record(record, convert)
        if converted is None:
            bad_rows.append((record.where, reason))
            report.invalid_reasons[reason] += 1
            continue
        sequences, extra = converted
        if any(len(seq.input_ids) > max_length for seq in sequences):
            if overflow == "drop":
                report.rows_dropped_too_long += 1
                continue
            sequences = [TokenizedExample(seq.input_ids[:max_length], seq.loss_mask[:max_length]) for seq in sequences]
            report.rows_truncated += 1
        if not all(any(seq.loss_mask[1:]) for seq in sequences):
            report.rows_dropped_no_loss += 1
            continue
        if check_fitted is not None and (why := check_fitted(sequences)) is not None:
            report.dropped_reasons[why] += 1
            continue
        kept.append((sequences, extra))
        report.tokens += sum(len(seq.input_ids) for seq in sequences)
        report.loss_tokens += sum(sum(seq.loss_mask) for seq in sequences)

    if bad_rows and not skip_invalid:
        listed = "\n".join(f"  {where}: {reason}" for where, reason in bad_rows[:MAX_LISTED_ERRORS])
        more = len(bad_rows) - MAX_LISTED_ERRORS
        listed += f"\n  ... and {more:,} more" if more > 0 else ""
        raise DataError(
            report.source,
            f"{_rows(len(bad_rows))} invalid; fix {'them' if len(bad_rows) > 1 else 'it'}, "
            f"or set data.skip_invalid=true to drop and count them:\n{listed}",
        )
    report.rows_kept = len(kept)
    assert report.rows_read == (
        report.rows_kept + report.rows_invalid + report.rows_dropped_too_long + report.rows_dropped_no_loss
        + sum(report.dropped_reasons.values())
    ), report
    if not kept:
        raise DataError(report.source, f"no usable rows. {report.summary()}")
    return kept, report


def _convert_record(record: Record, convert: Converter) -> tuple[tuple[list[TokenizedExample], Any], None] | tuple[None, str]:
    """The row converted, or why the row is invalid."""
    if record.error is not None:
        return None, record.error
    assert record.data is not None
    try:
        return convert(record.data), None
    except (ValueError, ChatTemplateError) as e:  # ChatTemplateError: this conversation only, so a bad row
        return None, str(e)


def _rows(n: int) -> str:
    return f"{n:,} row{'s' * (n != 1)}"
