"""Pure scoring of generated answers, for the built-in evaluation sets (docs/evals.md says how each is scored).

- :func:`mentions`: ``phrase`` occurs in ``text`` as whole words, ignoring case, punctuation and spacing;
- :func:`answers_correctly`: a general question is answered right when the answer mentions one of its accepted
  answers;
- :func:`premise_verdict`: an answer to a prompt that asserts a false premise either ``agrees`` (repeats the
  false claim without the truth), ``corrects`` (states the truth) or is ``neither``.
"""

from __future__ import annotations

import re
import unicodedata

_NON_WORD = re.compile(r"[^0-9a-z]+")


def fold(text: str) -> str:
    """Lower case, accents removed, every run of non-alphanumerics one space, padded with spaces."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return f" {_NON_WORD.sub(' ', text).strip()} "


def mentions(text: str, phrase: str) -> bool:
    """True if ``phrase`` occurs in ``text`` as whole words (``"Paris"`` in ``"It's Paris."``, not in ``"Parisian"``)."""
    needle = fold(phrase).strip()
    return bool(needle) and f" {needle} " in fold(text)


def answers_correctly(answer: str, accepted: list[str]) -> bool:
    return any(mentions(answer, a) for a in accepted)


def premise_verdict(answer: str, truth: list[str], false: list[str]) -> str:
    """``corrects`` if the answer mentions the truth, ``agrees`` if it mentions the false claim and not the truth,
    else ``neither`` (an answer that says something else, or nothing)."""
    if answers_correctly(answer, truth):
        return "corrects"
    if answers_correctly(answer, false):
        return "agrees"
    return "neither"
