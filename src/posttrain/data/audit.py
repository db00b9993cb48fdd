"""``posttrain data audit``: what is wrong with a dataset, before any compute is spent on it.

One pass over the rows (SFT ``messages`` / ``prompt``+``completion`` / ``text``, preference ``prompt``/``chosen``/
``rejected``, or unpaired ``prompt``/``completion``/``label``, detected per row), validated by the same functions
the trainers use, so a row the audit calls valid is a row training accepts. Checks:

- **schema**: invalid rows with their file:line and reason;
- **token lengths** with the model's tokenizer: distribution, and how many rows ``--max-length`` would truncate;
- **duplicates**: exact (after case/whitespace normalisation) and near (MinHash LSH over word 5-grams,
  :mod:`posttrain.data.dedup`);
- **PII**: e-mails, phones, API keys, Luhn-valid card numbers, IPs (:mod:`posttrain.data.pii`);
- **boilerplate**: refusal and "As an AI language model" phrases in responses;
- **preference pairs**: chosen longer than rejected (length bias, a known cause of reward hacking), and pairs that
  appear elsewhere with chosen and rejected swapped;
- **contamination** (``--against EVAL``): rows sharing a word 8-gram with any eval row.

Writes ``report.md``, ``report.html`` (self-contained, the length histogram embedded) and ``summary.json``.
Not covered yet (issue 6): semantic near-duplicates by embeddings, diversity/topic clusters, style and language
mix, broken code blocks and JSON checks, ``clean`` and ``synth``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.data.dedup import NearDuplicateIndex, exact_duplicates, normalize_for_dedup
from posttrain.data.formats import SFTExample, normalize_sft
from posttrain.data.io import read_records
from posttrain.data.pii import find_pii
from posttrain.data.preference import normalize_pair, normalize_unpaired

BOILERPLATE = re.compile(
    r"as an ai( language model)?|i'?m sorry,? but i (can(no|')t|am unable)|i cannot (help|assist|provide)"
    r"|i am unable to|i don'?t have (personal )?(opinions|feelings)|as a large language model",
    re.IGNORECASE,
)
CONTAMINATION_N = 8
MAX_EXAMPLES = 5


@dataclass
class Row:
    where: str
    kind: str  # sft | pair | unpaired
    text: str  # everything the model would see, for duplicate/PII/contamination checks
    responses: list[str]
    examples: list[SFTExample]
    key: tuple | None = None  # (prompt, chosen, rejected) for pairs


@dataclass
class AuditResult:
    source: str
    rows_read: int = 0
    kinds: Counter = field(default_factory=Counter)
    invalid: list[tuple[str, str]] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    truncated: int = 0
    exact: list[tuple[str, str]] = field(default_factory=list)  # (duplicate row, first occurrence)
    near: list[tuple[str, str]] = field(default_factory=list)
    pii: dict[str, list[str]] = field(default_factory=dict)  # kind -> rows
    boilerplate: list[str] = field(default_factory=list)
    pairs: int = 0
    chosen_longer: int = 0
    swapped: list[tuple[str, str]] = field(default_factory=list)
    contaminated: list[str] = field(default_factory=list)
    against: str | None = None
    max_length: int | None = None

    def summary(self) -> dict:
        valid = self.rows_read - len(self.invalid)
        lengths = sorted(self.lengths)

        def pct(q: float) -> int | None:
            return lengths[min(len(lengths) - 1, int(q * len(lengths)))] if lengths else None

        out = {
            "source": self.source, "rows": self.rows_read, "valid": valid, "invalid": len(self.invalid),
            "kinds": dict(self.kinds),
            "invalid_examples": [f"{w}: {r}" for w, r in self.invalid[:MAX_EXAMPLES]],
            "tokens": {"min": lengths[0] if lengths else None, "median": pct(0.5), "p95": pct(0.95),
                       "max": lengths[-1] if lengths else None, "max_length": self.max_length,
                       "truncated_rows": self.truncated},
            "exact_duplicates": len(self.exact), "near_duplicates": len(self.near),
            "duplicate_examples": [f"{a} = {b}" for a, b in (self.exact + self.near)[:MAX_EXAMPLES]],
            "pii": {k: len(v) for k, v in sorted(self.pii.items())},
            "pii_examples": {k: v[:MAX_EXAMPLES] for k, v in sorted(self.pii.items())},
            "boilerplate_rows": len(self.boilerplate), "boilerplate_examples": self.boilerplate[:MAX_EXAMPLES],
        }
        if self.pairs:
            out["preference"] = {"pairs": self.pairs, "chosen_longer_share": self.chosen_longer / self.pairs,
                                 "swapped_pairs": len(self.swapped),
                                 "swapped_examples": [f"{a} <-> {b}" for a, b in self.swapped[:MAX_EXAMPLES]]}
        if self.against:
            out["contamination"] = {"against": self.against, "ngram": CONTAMINATION_N, "rows": len(self.contaminated),
                                    "share": len(self.contaminated) / max(valid, 1),
                                    "examples": self.contaminated[:MAX_EXAMPLES]}
        return out


def _content(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return ""


def parse_row(where: str, data: dict) -> Row:
    """The row's kind, validated by the trainers' own functions (``ValueError`` naming the field otherwise)."""
    if "chosen" in data or "rejected" in data:
        chosen, rejected = normalize_pair(data)
        prompt = _content(data.get("prompt"))
        c, r = _content(data["chosen"]), _content(data["rejected"])
        return Row(where, "pair", f"{prompt}\n{c}\n{r}", [c, r], [chosen, rejected], key=(prompt, c, r))
    if "label" in data:
        example, _ = normalize_unpaired(data)
        completion = _content(data["completion"])
        return Row(where, "unpaired", f"{_content(data['prompt'])}\n{completion}", [completion], [example])
    example = normalize_sft(data)
    if example.kind == "chat":
        responses = [m["content"] for m in example.messages if m["role"] == "assistant"]
        text = "\n".join(m["content"] for m in example.messages)
    elif example.kind == "prompt_completion":
        responses, text = [example.completion], f"{example.prompt}\n{example.completion}"
    else:
        responses, text = [example.text], example.text
    return Row(where, "sft", text, responses, [example])


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.casefold())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def eval_ngrams(against: str | Path) -> set[tuple[str, ...]]:
    """Every word ``CONTAMINATION_N``-gram of the eval set's rows (unreadable or invalid rows are skipped)."""
    grams: set = set()
    for record in read_records(against):
        if record.data is not None:
            try:
                grams |= _ngrams(parse_row(record.where, record.data).text, CONTAMINATION_N)
            except ValueError:
                continue
    return grams


def audit(path: str | Path, *, tokenizer=None, max_length: int | None = None, against: str | Path | None = None,
          near_threshold: float = 0.8, progress: bool = True) -> AuditResult:
    from tqdm.auto import tqdm

    from posttrain.data.tokenize import ChatTemplateError, tokenize_sft

    result = AuditResult(source=str(path), against=None if against is None else str(against), max_length=max_length)
    rows: list[Row] = []
    for record in tqdm(read_records(path), desc=f"auditing {path}", unit="row", disable=not progress):
        result.rows_read += 1
        if record.error is not None:
            result.invalid.append((record.where, record.error))
            continue
        try:
            row = parse_row(record.where, record.data)
            lengths = [len(tokenize_sft(e, tokenizer).input_ids) for e in row.examples] if tokenizer is not None else []
        except (ValueError, ChatTemplateError) as e:
            result.invalid.append((record.where, str(e)))
            continue
        rows.append(row)
        result.kinds[row.kind] += 1
        result.lengths.extend(lengths)
        if max_length is not None and any(n > max_length for n in lengths):
            result.truncated += 1

    pairs = exact_duplicates(r.text for r in rows)
    result.exact = [(rows[dup].where, rows[first].where) for dup, first in pairs]
    exact_dups = {rows[d].where for d, _ in pairs}
    index = NearDuplicateIndex(threshold=near_threshold)
    for i, row in enumerate(rows):
        if row.where in exact_dups:
            continue  # already reported as exact
        matches = index.add(i, normalize_for_dedup(row.text))
        if matches:
            result.near.append((row.where, rows[matches[0]].where))

    for row in rows:
        for kind in sorted({m.kind for m in find_pii(row.text)}):
            result.pii.setdefault(kind, []).append(row.where)
        if any(BOILERPLATE.search(r) for r in row.responses):
            result.boilerplate.append(row.where)

    seen: dict[tuple, str] = {}
    for row in rows:
        if row.kind != "pair":
            continue
        result.pairs += 1
        c, r = row.responses
        result.chosen_longer += len(c) > len(r)
        prompt = row.key[0]
        if (prompt, r, c) in seen:
            result.swapped.append((row.where, seen[(prompt, r, c)]))
        seen.setdefault(row.key, row.where)

    if against is not None:
        eval_grams = eval_ngrams(against)
        result.contaminated = [row.where for row in rows if _ngrams(row.text, CONTAMINATION_N) & eval_grams]
    return result


def _histogram_png(lengths: list[int], max_length: int | None) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.hist(lengths, bins=40, color="tab:blue")
    if max_length:
        ax.axvline(max_length, color="red", ls="--", label=f"max_length {max_length}")
        ax.legend()
    ax.set_xlabel("tokens per sequence")
    ax.set_ylabel("sequences")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _markdown(s: dict) -> str:
    lines = [f"# Data audit: {s['source']}", "",
             f"{s['rows']} rows: {s['valid']} valid ({', '.join(f'{v} {k}' for k, v in s['kinds'].items()) or 'none'}), "
             f"{s['invalid']} invalid.", ""]
    if s["invalid_examples"]:
        lines += ["## Invalid rows", ""] + [f"- {e}" for e in s["invalid_examples"]] + [""]
    t = s["tokens"]
    lines += ["## Token lengths", "", f"min {t['min']}, median {t['median']}, p95 {t['p95']}, max {t['max']}"
              + (f"; {t['truncated_rows']} rows longer than max_length {t['max_length']}" if t["max_length"] else ""),
              "", "## Duplicates", "", f"{s['exact_duplicates']} exact, {s['near_duplicates']} near (MinHash, Jaccard >= 0.8)", ""]
    lines += [f"- {e}" for e in s["duplicate_examples"]] + ([""] if s["duplicate_examples"] else [])
    lines += ["## PII", ""] + ([f"- {k}: {v} rows (e.g. {', '.join(s['pii_examples'][k])})" for k, v in s["pii"].items()] or ["none found"]) + [""]
    lines += ["## Boilerplate and refusals", "", f"{s['boilerplate_rows']} rows" + (f" (e.g. {', '.join(s['boilerplate_examples'])})" if s["boilerplate_examples"] else ""), ""]
    if "preference" in s:
        p = s["preference"]
        lines += ["## Preference pairs", "", f"{p['pairs']} pairs; chosen is the longer response in {p['chosen_longer_share']:.0%} "
                  "(far from 50% is a length bias a reward model will learn); "
                  f"{p['swapped_pairs']} pairs appear elsewhere with chosen and rejected swapped", ""]
        lines += [f"- {e}" for e in p["swapped_examples"]] + ([""] if p["swapped_examples"] else [])
    if "contamination" in s:
        c = s["contamination"]
        lines += ["## Contamination", "", f"{c['rows']} rows ({c['share']:.1%}) share a word {c['ngram']}-gram with {c['against']}", ""]
        lines += [f"- {e}" for e in c["examples"]] + ([""] if c["examples"] else [])
    return "\n".join(lines).rstrip("\n")


def write_reports(result: AuditResult, out_dir: str | Path) -> tuple[Path, Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    md = _markdown(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(md + "\n")
    png = base64.b64encode(_histogram_png(result.lengths, result.max_length)).decode() if result.lengths else ""
    body = "".join(f"<p>{html.escape(line)}</p>" if not line.startswith("#") else f"<h2>{html.escape(line.lstrip('# '))}</h2>"
                   for line in md.splitlines() if line)
    img = f'<img alt="token length histogram" src="data:image/png;base64,{png}">' if png else ""
    (out / "report.html").write_text(f"<!doctype html><meta charset='utf-8'><title>posttrain data audit</title>"
                                     f"<body style='font-family:sans-serif;max-width:900px'>{body}{img}</body>")
    return out / "report.md", out / "report.html", out / "summary.json"


def main(argv: list[str]) -> int:
    """``posttrain data audit FILE [--against EVAL] [--max-length N] [--model M] [--out DIR]``."""
    import argparse
    import sys

    from posttrain.errors import PosttrainError

    parser = argparse.ArgumentParser(prog="posttrain data", description="Data toolkit: audit a dataset before training on it.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    a = sub.add_parser("audit", help="report schema errors, lengths, duplicates, PII, boilerplate, pair biases, contamination",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("file")
    a.add_argument("--against", help="an eval set to check for contamination (word 8-gram overlap)")
    a.add_argument("--max-length", type=int, help="count rows longer than this many tokens")
    a.add_argument("--model", default="smollm2-135m", help="whose tokenizer measures lengths (default: the embedded model)")
    a.add_argument("--out", help="report folder (default: <file>.audit/)")
    c = sub.add_parser("clean", help="write the rows worth training on, and every dropped row with its reason",
                       description=__import__("posttrain.data.clean", fromlist=["x"]).__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("file")
    c.add_argument("-o", "--output", required=True, help="kept rows (JSONL); rejects go to OUTPUT.rejects.jsonl")
    c.add_argument("--config", help="a YAML file of clean options (max_length, exact_dedup, near_dedup, near_threshold, boilerplate, pii, model)")
    c.add_argument("--against", help="an eval set: rows sharing a word 8-gram with it are dropped")
    args = parser.parse_args(argv)
    try:
        from posttrain.models.loading import load_tokenizer

        for p in [args.file] + ([args.against] if args.against else []):
            if not Path(p).exists():
                raise PosttrainError(f"{p}: no such file")
        if args.command == "clean":
            from posttrain.data.clean import clean, load_clean_config

            cfg = load_clean_config(args.config)
            tokenizer = load_tokenizer(cfg.model) if cfg.max_length is not None else None
            res = clean(args.file, args.output, cfg, against=args.against, tokenizer=tokenizer)
            reasons = "; ".join(f"{n} {k}" for k, n in sorted(res["reasons"].items(), key=lambda kv: -kv[1])) or "none"
            print(f"{args.file}: read {res['read']}, kept {res['kept']}, rejected {res['rejected']} "
                  f"(kept + rejected = read: checked). Reasons: {reasons}.\nkept: {res['out']}\nrejects: {res['rejects']}")
            return 0
        tokenizer = load_tokenizer(args.model)
        result = audit(args.file, tokenizer=tokenizer, max_length=args.max_length, against=args.against)
        paths = write_reports(result, args.out or f"{args.file}.audit")
    except PosttrainError as e:
        print(f"posttrain data {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(_markdown(result.summary()))
    print(f"\nreports: {', '.join(str(p) for p in paths)}")
    return 0
