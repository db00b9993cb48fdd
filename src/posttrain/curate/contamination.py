"""Eval items inside training rows: word n-gram overlap against an eval set (:class:`EvalIndex`)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from posttrain.curate.rows import parse_row
from posttrain.data.io import read_records

CONTAMINATION_N = 8
CONTAMINATION_SHARE = 0.5  # of an eval row's identifying n-grams; see EvalIndex
TEMPLATE_SHARE, TEMPLATE_MIN_ROWS = 0.05, 2


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.casefold())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _strings(value) -> list[str]:
    """Every string inside a row's values (message contents, prompt, completion, chosen, ...)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


class EvalIndex:
    """The eval set's word ``CONTAMINATION_N``-grams, for finding eval items inside training rows.

    Each eval row is cut into segments: the paragraphs (blank-line separated) of each of its fields or messages,
    so a question, its input and its answer are judged apart. A training row is contaminated when it holds at
    least ``CONTAMINATION_SHARE`` of one segment's identifying n-grams: a verbatim or lightly edited copy of that
    part of the item, whatever else the training row holds. An n-gram found in more than ``TEMPLATE_SHARE`` of the
    eval rows (and in at least ``TEMPLATE_MIN_ROWS``) is the set's shared instruction, system prompt or answer
    format, not an item's content, and is ignored; without this every row of a templated task would match.
    Segments shorter than ``CONTAMINATION_N`` words cannot be checked. (Word n-gram overlap is the method of
    the GPT-3 and Llama 2 contamination studies; a per-item share decides in Llama 2's, there over tokens.)
    Unreadable or invalid eval rows are skipped."""

    def __init__(self, against: str | Path):
        self.against = str(against)
        segments: list[tuple[int, set]] = []
        self.where: list[str] = []
        counts: Counter = Counter()
        for record in read_records(against):
            if record.data is None:
                continue
            try:
                parse_row(record.where, record.data)
            except ValueError:
                continue
            row_grams: set = set()
            for text in _strings(record.data):
                for paragraph in re.split(r"\n\s*\n", text):
                    grams = _ngrams(paragraph, CONTAMINATION_N)
                    if grams:
                        segments.append((len(self.where), grams))
                        row_grams |= grams
            self.where.append(record.where)
            counts.update(row_grams)
        limit = max(TEMPLATE_MIN_ROWS - 1, TEMPLATE_SHARE * len(self.where))
        self.index: dict[tuple, list[int]] = {}
        self.owner: list[int] = []
        self.size: list[int] = []
        for row, grams in segments:
            own = [g for g in grams if counts[g] <= limit]
            if not own:
                continue  # all template
            for g in own:
                self.index.setdefault(g, []).append(len(self.size))
            self.owner.append(row)
            self.size.append(len(own))

    def __bool__(self) -> bool:
        return bool(self.index)

    def match(self, text: str) -> tuple[str, float] | None:
        """(the eval row's location, the share of its segment's n-grams in ``text``) of the best match, if any
        segment reaches ``CONTAMINATION_SHARE``."""
        hits: Counter = Counter()
        for g in _ngrams(text, CONTAMINATION_N):
            hits.update(self.index.get(g, ()))
        best = max(((n / self.size[i], i) for i, n in hits.items()), default=None)
        if best is None or best[0] < CONTAMINATION_SHARE:
            return None
        return self.where[self.owner[best[1]]], best[0]
