"""Find and redact personal data and secrets in free text, by regular expressions plus validation.

Each detector finds candidates with a regex and keeps only those that pass a check:

- ``email``: ``local@domain.tld`` with a dotted domain and an alphabetic TLD of 2+ letters. Quoted local
  parts, IP-literal domains (``user@[10.0.0.1]``) and internationalised (non-ASCII) addresses are not found.
- ``phone``: international numbers starting with ``+`` and a country code (``+44 20 7946 0958``,
  ``+1 (555) 123-4567``, ``+14155552671``; 8-15 digits as in E.164), North-American national forms
  (``(555) 123-4567``, ``555-123-4567``, ``555.123.4567``, ``555 123 4567`` with one separator used throughout,
  optional leading ``1-``) and trunk-prefixed national forms in three groups (``020 7946 0958``). A national
  number written as a bare run of digits (``5551234567``) is not found, on purpose: it cannot be told apart
  from an order number. Conversely an identifier that happens to be shaped ``ddd-ddd-dddd`` is reported.
- ``api_key``: known token shapes only: OpenAI-style ``sk-...`` (20+ chars after the prefix, ``sk-proj-``/
  ``sk-ant-`` included), GitHub ``ghp_``/``gho_``/``ghu_``/``ghs_``/``ghr_`` + 36 chars and ``github_pat_``,
  AWS access key ids ``AKIA`` + 16 upper-case alphanumerics, Slack ``xox[baprs]-...``, Hugging Face ``hf_`` +
  30+ chars, and ``Bearer <token>`` with a token of 20+ chars (the span is the token, not the word Bearer).
  Secrets without a recognisable prefix (AWS secret keys, random passwords) are not found.
- ``credit_card``: 13-19 digits, contiguous or grouped by single spaces or dashes (one separator kind,
  groups of 4, or the 4-6-5 / 4-6-4 Amex and Diners layouts), that pass the Luhn check. A digit run that
  fails Luhn is not reported; about one random 13-19 digit run in ten passes it, so a long contiguous order
  or account number can be reported as a card.
- ``ipv4``: dotted quads with every octet 0-255 and no leading zeros (validated by :mod:`ipaddress`). Runs of
  more than four dotted numbers (``1.2.3.4.5``) and quads glued to letters (``v1.2.3.4``) are skipped.
- ``ipv6``: colon-separated hex groups (with ``::`` compression and an optional embedded IPv4 tail) that
  :class:`ipaddress.IPv6Address` accepts and that contain at least one decimal digit (so C++ scopes like
  ``a::b`` are skipped, and so is the all-letter ``dead::beef``). Zone ids (``fe80::1%eth0``)
  and bracketed URL forms keep only the address part; times like ``12:30:45`` and MAC addresses are rejected.

Matches never overlap: when two detectors claim the same characters, the one earlier in :data:`KINDS` wins
(so a card number is never also half a phone number).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

KINDS: tuple[str, ...] = ("api_key", "email", "credit_card", "ipv6", "ipv4", "phone")
"""Every detector, in the priority order used to resolve overlapping matches."""


@dataclass(frozen=True)
class PIIMatch:
    """One finding: ``text[start:end] == value``."""

    kind: str
    start: int
    end: int
    value: str


_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])"
)

_API_KEYS = [
    re.compile(r"(?<![\w-])sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"),
    re.compile(r"(?<!\w)gh[pousr]_[A-Za-z0-9]{36,}(?!\w)"),
    re.compile(r"(?<!\w)github_pat_[A-Za-z0-9_]{22,}"),
    re.compile(r"(?<![A-Za-z0-9])AKIA[0-9A-Z]{16}(?![A-Za-z0-9])"),
    re.compile(r"(?<![\w-])xox[baprs]-[A-Za-z0-9-]{10,}"),
    re.compile(r"(?<!\w)hf_[A-Za-z0-9]{30,}(?!\w)"),
    re.compile(r"\bBearer\s+([A-Za-z0-9._~+/-]{20,}=*)"),
]

# Groups of digits separated by at most one space or dash; layout and Luhn are checked afterwards.
_CARD = re.compile(r"(?<![\d.,-])\d(?:[ -]?\d){12,18}(?![\d-]|[.,]\d)")
_CARD_LAYOUTS = ((4, 6, 5), (4, 6, 4))

_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{0,4})(?![\w:]|\.\d)"
)

_PHONES = [
    # International: +CC then 2-6 groups of digits (a group may sit in parentheses).
    re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,4})){2,6}(?!\w|[.-]\d)"),
    # North American: (555) 123-4567 ...
    re.compile(r"(?<![\w(+-])(?:1[ .-]?)?\(\d{3}\) ?\d{3}[ .-]\d{4}(?!\w|[.-]\d)"),
    # ... and 555-123-4567 / 555.123.4567 / 555 123 4567, one separator throughout.
    re.compile(r"(?<![\w.+-])(?:1([ .-]))?\d{3}([ .-])\d{3}\2\d{4}(?!\w|[.-]\d)"),
    # Trunk-prefixed national: 020 7946 0958, 030-1234-5678.
    re.compile(r"(?<![\w.+-])0\d{1,4}([ -])\d{3,4}\1\d{3,4}(?!\w|[.-]\d)"),
]


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) checksum used by payment card numbers; ``digits`` holds digits only."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_ok(candidate: str) -> bool:
    digits = re.sub(r"[ -]", "", candidate)
    if not 13 <= len(digits) <= 19 or not luhn_valid(digits):
        return False
    seps = set(re.findall(r"[ -]", candidate))
    if not seps:
        return True
    if len(seps) > 1:
        return False
    groups = tuple(len(g) for g in re.split(r"[ -]", candidate))
    return groups in _CARD_LAYOUTS or (all(g == 4 for g in groups[:-1]) and 1 <= groups[-1] <= 4)


def _ipv4_ok(candidate: str) -> bool:
    try:
        ipaddress.IPv4Address(candidate)
    except ValueError:
        return False
    return True


def _ipv6_ok(candidate: str) -> bool:
    if not re.search(r"[0-9]", candidate):  # "a::b" (C++ scopes) parses as IPv6 but is not one
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def _phone_ok(candidate: str) -> bool:
    n = sum(ch.isdigit() for ch in candidate)
    return 8 <= n <= 15 if candidate.startswith("+") else 10 <= n <= 11


def _candidates(text: str, kind: str) -> Iterable[tuple[int, int]]:
    if kind == "email":
        yield from (m.span() for m in _EMAIL.finditer(text))
    elif kind == "api_key":
        for pattern in _API_KEYS:
            for m in pattern.finditer(text):
                yield m.span(m.lastindex or 0) if pattern.groups else m.span()
    elif kind == "credit_card":
        yield from (m.span() for m in _CARD.finditer(text) if _card_ok(m.group()))
    elif kind == "ipv4":
        yield from (m.span() for m in _IPV4.finditer(text) if _ipv4_ok(m.group()))
    elif kind == "ipv6":
        yield from (m.span() for m in _IPV6.finditer(text) if _ipv6_ok(m.group()))
    elif kind == "phone":
        for pattern in _PHONES:
            yield from (m.span() for m in pattern.finditer(text) if _phone_ok(m.group()))
    else:
        raise AssertionError(kind)


def _check_kinds(kinds: Iterable[str] | None) -> frozenset[str]:
    if kinds is None:
        return frozenset(KINDS)
    chosen = frozenset([kinds] if isinstance(kinds, str) else kinds)
    unknown = sorted(chosen - set(KINDS))
    if unknown:
        raise ValueError(f"unknown PII kind(s) {unknown}; expected some of {list(KINDS)}")
    return chosen


def find_pii(text: str, kinds: Iterable[str] | None = None) -> list[PIIMatch]:
    """Every PII match in ``text``, sorted by start, non-overlapping.

    Overlaps are resolved across all detectors before ``kinds`` filters the result, so asking for one kind
    never returns a fragment of a longer match of another kind.
    """
    wanted = _check_kinds(kinds)
    taken: list[tuple[int, int]] = []
    found: list[PIIMatch] = []
    for kind in KINDS:
        for start, end in _candidates(text, kind):
            if any(start < e and s < end for s, e in taken):
                continue
            taken.append((start, end))
            if kind in wanted:
                found.append(PIIMatch(kind, start, end, text[start:end]))
    found.sort(key=lambda m: m.start)
    return found


def redact(text: str, kinds: Iterable[str] | None = None) -> str:
    """``text`` with each match replaced by its upper-cased kind in brackets: ``[EMAIL]``, ``[PHONE]``,
    ``[API_KEY]``, ``[CREDIT_CARD]``, ``[IPV4]``, ``[IPV6]``."""
    out: list[str] = []
    pos = 0
    for m in find_pii(text, kinds):
        out.append(text[pos : m.start])
        out.append(f"[{m.kind.upper()}]")
        pos = m.end
    out.append(text[pos:])
    return "".join(out)
