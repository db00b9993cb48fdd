#!/usr/bin/env python3
"""Rewrite the README's suite line from a saved pytest log: ``.ci/suite_line.py LOG [--date YYYY-MM-DD]``.

The line sits between ``<!-- suite:start -->`` and ``<!-- suite:end -->`` in README.md's "Tests" section. It is
taken from the last pytest summary line in LOG, either form:

    ==== 1043 passed, 13 skipped, 3 warnings in 732.51s (0:12:12) ====
    1043 passed, 13 skipped in 732.51s (0:12:12)

and written as ``1043 passed, 13 skipped, 12m12s of pytest, 2026-12-02`` (warnings are not counted; the time is
pytest's own h:mm:ss when it printed one, else its seconds, truncated as pytest does; the date is --date, default
today). Only the standard library is used, so it runs before any install.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- suite:start -->", "<!-- suite:end -->"

OUTCOMES = ("failed", "passed", "skipped", "deselected", "xfailed", "xpassed", "error", "errors")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SUMMARY = re.compile(r"^=*\s*(?P<counts>\d+ \w+(?:, \d+ \w+)*) in (?P<secs>\d+(?:\.\d+)?)s"
                      r"(?: \((?P<hms>\d+:\d\d:\d\d)\))?\s*=*$")


def parse_summary(log: str) -> tuple[list[tuple[int, str]], float, str]:
    """The outcome counts (in pytest's order, warnings left out), the seconds and the duration as ``12m12s`` of
    the last pytest summary line in ``log``; ValueError when there is none."""
    for line in reversed(_ANSI.sub("", log).splitlines()):
        m = _SUMMARY.match(line.strip())
        if not m:
            continue
        counts = []
        for part in m["counts"].split(", "):
            n, word = part.split(" ", 1)
            if word in OUTCOMES:
                counts.append((int(n), word))
        if not counts:
            continue
        secs = float(m["secs"])
        if m["hms"]:
            h, mi, s = map(int, m["hms"].split(":"))
        else:
            h, rest = divmod(int(secs), 3600)
            mi, s = divmod(rest, 60)
        duration = f"{h}h{mi:02d}m{s:02d}s" if h else f"{mi}m{s:02d}s" if mi else f"{s}s"
        return counts, secs, duration
    raise ValueError("no pytest summary line (such as '1043 passed, 13 skipped in 732.51s (0:12:12)') in the log")


def suite_line(log: str, date: str) -> str:
    """The README's suite line for a pytest log: ``1043 passed, 13 skipped, 12m12s of pytest, 2026-12-02``."""
    counts, _, duration = parse_summary(log)
    return ", ".join(f"{n} {word}" for n, word in counts) + f", {duration} of pytest, {date}"


def rewrite(readme_text: str, line: str) -> str:
    """``readme_text`` with the text between the suite markers replaced by ``line``."""
    if readme_text.count(START) != 1 or readme_text.count(END) != 1:
        raise ValueError(f"the README needs exactly one {START} ... {END}")
    head, rest = readme_text.split(START, 1)
    _, tail = rest.split(END, 1)
    return head + START + line + END + tail


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log", type=Path, help="a saved pytest output log")
    ap.add_argument("--date", default=datetime.date.today().isoformat(), help="date of the run (default: today)")
    ap.add_argument("--readme", type=Path, default=README, help="README to rewrite (default: the repository's)")
    args = ap.parse_args(argv)
    try:
        datetime.date.fromisoformat(args.date)
        line = suite_line(args.log.read_text(errors="replace"), args.date)
        args.readme.write_text(rewrite(args.readme.read_text(), line))
    except (OSError, ValueError) as e:
        print(f"suite_line: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.readme}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
