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
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from posttrain.data.formats import normalize_sft
from posttrain.data.io import Record, read_records
from posttrain.data.tokenize import LOSS_ON, ChatTemplateError, TokenizedExample, tokenize_sft
from posttrain.errors import DataError

OVERFLOW = ("truncate", "drop")
MAX_LISTED_ERRORS = 10
PROGRESS_MIN_ROWS = 2000  # below this tokenizing takes about a second; a bar would only be noise


@dataclass
class DataReport:
    """What happened to each row read: ``rows_read == rows_kept + rows_invalid + the two drop counts``."""

    source: str  # the path as the user gave it
    max_length: int
    rows_read: int = 0
    rows_kept: int = 0
    invalid_reasons: Counter[str] = field(default_factory=Counter)  # reason -> rows skipped for it
    rows_truncated: int = 0  # kept, cut to max_length
    rows_dropped_too_long: int = 0  # overflow="drop"
    rows_dropped_no_loss: int = 0  # no target token left (truncation cut every assistant token)
    tokens: int = 0  # in kept rows, after truncation
    loss_tokens: int = 0

    @property
    def rows_invalid(self) -> int:
        return sum(self.invalid_reasons.values())

    def summary(self) -> str:
        """One paragraph for the log: what was kept, and why everything else was not."""
        share = f"{100 * self.loss_tokens / self.tokens:.1f}%" if self.tokens else "0%"
        parts = [
            f"{self.source}: read {_rows(self.rows_read)}, kept {self.rows_kept:,} "
            f"({self.tokens:,} tokens, {share} of them trained on)."
        ]
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
    if max_length < 1:
        raise ValueError(f"max_length: expected a positive number of tokens, got {max_length}")
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow: expected one of {', '.join(OVERFLOW)}, got {overflow!r}")
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on: expected one of {', '.join(LOSS_ON)}, got {loss_on!r}")

    report = DataReport(source=os.fspath(path), max_length=max_length)
    records = list(read_records(path))  # materialised so the progress bar knows the total
    report.rows_read = len(records)
    bad_rows: list[tuple[str, str]] = []  # (where, reason)
    examples: list[TokenizedExample] = []
    progress = tqdm(
        records, desc=f"tokenizing {report.source}", unit="row", disable=len(records) <= PROGRESS_MIN_ROWS
    )
    for record in progress:
        example, reason = _tokenize_record(record, tokenizer, loss_on)
        if example is None:
            bad_rows.append((record.where, reason))
            report.invalid_reasons[reason] += 1
            continue
        if len(example.input_ids) > max_length:
            if overflow == "drop":
                report.rows_dropped_too_long += 1
                continue
            example = TokenizedExample(example.input_ids[:max_length], example.loss_mask[:max_length])
            report.rows_truncated += 1
        if not any(example.loss_mask):
            report.rows_dropped_no_loss += 1
            continue
        examples.append(example)
        report.tokens += len(example.input_ids)
        report.loss_tokens += sum(example.loss_mask)

    if bad_rows and not skip_invalid:
        listed = "\n".join(f"  {where}: {reason}" for where, reason in bad_rows[:MAX_LISTED_ERRORS])
        more = len(bad_rows) - MAX_LISTED_ERRORS
        listed += f"\n  ... and {more:,} more" if more > 0 else ""
        raise DataError(
            report.source,
            f"{_rows(len(bad_rows))} invalid; fix {'them' if len(bad_rows) > 1 else 'it'}, "
            f"or set data.skip_invalid=true to drop and count them:\n{listed}",
        )
    report.rows_kept = len(examples)
    assert report.rows_read == (
        report.rows_kept + report.rows_invalid + report.rows_dropped_too_long + report.rows_dropped_no_loss
    ), report
    if not examples:
        raise DataError(report.source, f"no usable rows. {report.summary()}")
    return examples, report


def _tokenize_record(
    record: Record, tokenizer: PreTrainedTokenizerBase, loss_on: str
) -> tuple[TokenizedExample, None] | tuple[None, str]:
    """The row's tokens, or why the row is invalid."""
    if record.error is not None:
        return None, record.error
    assert record.data is not None
    try:
        example = normalize_sft(record.data)
    except ValueError as e:
        return None, str(e)
    try:
        return tokenize_sft(example, tokenizer, loss_on), None
    except ChatTemplateError as e:  # raised for this conversation only, so it is a bad row
        return None, str(e)


def _rows(n: int) -> str:
    return f"{n:,} row{'s' * (n != 1)}"
