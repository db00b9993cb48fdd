"""``posttrain data audit``: what is wrong with a dataset, before any compute is spent on it.

One pass over the rows (SFT ``messages`` / ``prompt``+``completion`` / ``text``, preference ``prompt``/``chosen``/
``rejected``, or unpaired ``prompt``/``completion``/``label``, detected per row), validated by the same functions
the trainers use, so a row the audit calls valid is a row training accepts. Checks:

- **schema**: invalid rows with their file:line and reason;
- **token lengths** with the model's tokenizer: distribution, and how many rows ``--max-length`` would truncate;
- **duplicates**: exact (after case/whitespace normalisation) and near (MinHash LSH over word 5-grams,
  :mod:`posttrain.curate.dedup`);
- **PII**: e-mails, phones, API keys, Luhn-valid card numbers, IPs (:mod:`posttrain.curate.pii`);
- **boilerplate**: refusal and "As an AI language model" phrases in responses;
- **consistency** (:mod:`posttrain.curate.consistency`): shares of responses using markdown, person and tone markers,
  the response/prompt length ratio, and the features mixed between two styles (10-90%), with rows of the minority
  style; summary.json ``consistency``;
- **language** (:mod:`posttrain.curate.consistency`, offline ``py3langid``): the language distribution of responses,
  rows not in the majority language, and prompts answered in another language; summary.json ``language``;
- **accuracy signals** (:mod:`posttrain.curate.accuracy`): responses contradicting a ``reference``/``answer``/
  ``ground_truth`` column, broken code blocks (unclosed fences, Python that ``ast.parse`` rejects, bad JSON
  blocks), and invalid JSON where the prompt or the response's start says JSON; summary.json ``accuracy``;
- **preference pairs**: chosen longer than rejected (length bias, a known cause of reward hacking), and pairs that
  appear elsewhere with chosen and rejected swapped;
- **contamination** (``--against EVAL``): rows holding at least half of the word 8-grams of some paragraph
  of an eval row (n-grams shared by many eval rows, i.e. their template, are ignored; :class:`EvalIndex`);
- **semantic duplicates**: rows whose sentence embeddings (all-MiniLM-L6-v2, :mod:`posttrain.curate.embed`) have
  cosine >= ``--semantic-threshold`` (0.9) with an earlier row, among rows not already exact or near duplicates;
  at most ``--embed-max`` rows are embedded (a uniform sample beyond that, and the report says so);
- **diversity** (:mod:`posttrain.curate.diversity`): distinct-1/2 of responses, the most repeated instruction
  openings, and k-means topic clusters of the embeddings with their distinctive words.

Writes ``report.md``, ``report.html`` (self-contained, the length histogram and cluster sizes embedded) and ``summary.json``.
``posttrain data clean`` applies the same checks as filters; ``posttrain data synth`` generates data through them.

Memory: the rows are streamed (:func:`posttrain.data.io.read_records`) and every check runs in that one pass; no
row's text is kept once the pass moves on. What is kept grows with the number of rows, in compact form: per valid
row, a 16-byte digest with its ``where`` (exact duplicates), a MinHash signature and band links, about 1 KB
(:class:`~posttrain.curate.dedup.NearDuplicateIndex`), its token lengths, per response its style features and
length ratio and its detected languages (the consistency tallies, with ``where``), and with embeddings on, an
8-byte stream position if it is not a duplicate; per preference pair, a 16-byte digest and ``where`` (swapped
pairs). Also kept: the distinct word 1- and 2-grams of the responses (distinct-n; these grow with the vocabulary
in use), the count of each instruction opening, the ``where`` of each flagged row, and the eval set's n-gram index
(``--against``). When more than ``--embed-max`` rows are eligible for embedding, a second pass reads back only the
sampled rows' texts.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.curate.accuracy import AccuracyTally, accuracy_markdown
from posttrain.curate.consistency import LanguageTally, StyleTally, consistency_markdown, target_turns
from posttrain.curate.contamination import CONTAMINATION_N, EvalIndex
from posttrain.curate.dedup import NearDuplicateIndex, normalize_for_dedup
from posttrain.curate.diversity import (
    PATTERN_FLAG_SHARE,
    DistinctNgrams,
    flagged_patterns,
    instruction_pattern,
    instruction_text,
    top_patterns,
    topic_clusters,
)
from posttrain.curate.pii import find_pii
from posttrain.curate.rows import BOILERPLATE, Row, parse_row
from posttrain.data.io import read_records
from posttrain.errors import DataError

MAX_EXAMPLES = 5
SEMANTIC_THRESHOLD = 0.9  # why 0.9: see _semantic_and_diversity
EMBED_MAX = 5000  # rows embedded at most: 2-12 minutes on one CPU core (measured 50 rows/s at 40 tokens, 7 at 256)




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
    semantic: list[tuple[str, str, float]] = field(default_factory=list)  # (duplicate row, first occurrence, cosine)
    semantic_threshold: float = SEMANTIC_THRESHOLD
    embedding: dict = field(default_factory=dict)  # {"skipped": why} or {"eligible": rows, "embedded": rows}
    diversity: dict = field(default_factory=dict)
    style: StyleTally = field(default_factory=StyleTally)
    languages: LanguageTally = field(default_factory=LanguageTally)
    accuracy: AccuracyTally = field(default_factory=AccuracyTally)

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
        out.update(consistency=self.style.summary(), language=self.languages.summary(),
                   accuracy=self.accuracy.summary())
        if self.pairs:
            out["preference"] = {"pairs": self.pairs, "chosen_longer_share": self.chosen_longer / self.pairs,
                                 "swapped_pairs": len(self.swapped),
                                 "swapped_examples": [f"{a} <-> {b}" for a, b in self.swapped[:MAX_EXAMPLES]]}
        if self.against:
            out["contamination"] = {"against": self.against, "ngram": CONTAMINATION_N, "rows": len(self.contaminated),
                                    "share": len(self.contaminated) / max(valid, 1),
                                    "examples": self.contaminated[:MAX_EXAMPLES]}
        out["semantic_duplicates"] = {"threshold": self.semantic_threshold, **self.embedding, "pairs": len(self.semantic),
                                      "examples": [f"{a} ~ {b} ({c:.3f})" for a, b, c in self.semantic[:MAX_EXAMPLES]]}
        out["diversity"] = self.diversity
        return out

















@dataclass
class _DiversityTally:
    """What the diversity and semantic-duplicate checks need from the streaming pass, without the row texts."""

    distinct_1: DistinctNgrams = field(default_factory=lambda: DistinctNgrams(1))
    distinct_2: DistinctNgrams = field(default_factory=lambda: DistinctNgrams(2))
    responses: int = 0
    patterns: Counter = field(default_factory=Counter)  # instruction opening -> valid rows
    eligible: array = field(default_factory=lambda: array("q"))  # stream positions of the rows to embed
    held: list[tuple[str, str]] = field(default_factory=list)  # (where, text) of those, while <= embed_max

    def add(self, row: Row) -> None:
        for response in row.responses:
            self.distinct_1.add(response)
            self.distinct_2.add(response)
        self.responses += len(row.responses)
        self.patterns[instruction_pattern(instruction_text(row.examples[0]))] += 1

    def add_eligible(self, position: int, row: Row, embed_max: int) -> None:
        self.eligible.append(position)
        if len(self.eligible) <= embed_max:
            self.held.append((row.where, row.text))
        else:
            self.held = []  # more than embed_max: the sample is read back in a second pass


def _read_sample(path: str | Path, positions: set[int], progress: bool) -> list[tuple[str, str]]:
    """``(where, text)`` of the rows at these stream positions of ``path``, in input order."""
    from tqdm.auto import tqdm

    sample = []
    for position, record in enumerate(tqdm(read_records(path), desc="reading the rows to embed", unit="row",
                                           disable=not progress)):
        if position in positions:
            if record.data is None:
                raise DataError(record.where, "the file changed while it was audited; audit it again")
            sample.append((record.where, parse_row(record.where, record.data).text))
    if len(sample) != len(positions):
        raise DataError(str(path), "the file changed while it was audited; audit it again")
    return sample


def _semantic_and_diversity(result: AuditResult, tally: _DiversityTally, path: str | Path, *, embed: bool,
                            embed_max: int, threshold: float, clusters: int | None, embedder, progress: bool) -> None:
    """Fill ``result.diversity``, and unless ``embed`` is False, ``result.semantic`` and the topic clusters.

    Rows already exact or near duplicates are not embedded; beyond ``embed_max`` rows a uniform sample (seed 0,
    input order kept) is, read back from ``path``. The default threshold, 0.9, comes from this model's cosines
    on whole rows (instruction + answer; tests/curate/test_data_diversity.py pins a subset): 12 pairs reworded with the
    same meaning scored 0.81-0.99 (half of them >= 0.9), 8 pairs on the same template or topic asking something else
    ("capital of France" / "of Germany", "5 miles" / "7 miles") 0.39-0.81, unrelated rows at most 0.35. So 0.9
    flags only pairs closer than every different-question pair we measured, and finds the closer half of
    paraphrases; a lower threshold finds more of them at the risk of flagging rows that differ.
    """
    top = top_patterns(tally.patterns.elements())  # every valid row's opening; their order does not matter
    result.diversity = {
        "responses": tally.responses, "distinct_1": tally.distinct_1.value(), "distinct_2": tally.distinct_2.value(),
        "instruction_patterns": [{"pattern": p, "rows": n, "share": share} for p, n, share in top],
        "flagged_patterns": flagged_patterns(top), "clusters": None,
    }
    result.semantic_threshold = threshold
    if not embed:
        result.embedding = {"skipped": "--no-embed"}
        return
    import numpy as np

    from posttrain.curate.embed import Embedder, SemanticDuplicateIndex

    eligible = len(tally.eligible)
    sample = tally.held
    if eligible > embed_max:
        picks = np.sort(np.random.default_rng(0).choice(eligible, size=embed_max, replace=False))
        sample = _read_sample(path, {tally.eligible[i] for i in picks}, progress)
    result.embedding = {"eligible": eligible, "embedded": len(sample), "sampled": len(sample) < eligible}
    if not sample:
        return
    texts = [text for _, text in sample]
    vectors = (embedder or Embedder(progress=progress)).encode(texts, desc="embedding rows")  # (n, 384)
    index = SemanticDuplicateIndex(threshold)
    block = 1024
    for start in range(0, len(sample), block):
        chunk = sample[start : start + block]
        for (where, _), match in zip(chunk, index.add([w for w, _ in chunk], vectors[start : start + block])):
            if match is not None:
                result.semantic.append((where, match[0], match[1]))
    result.diversity["clusters"] = topic_clusters(vectors, texts, clusters)


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def audit(path: str | Path, *, tokenizer=None, max_length: int | None = None, against: str | Path | None = None,
          near_threshold: float = 0.8, embed: bool = True, embed_max: int = EMBED_MAX,
          semantic_threshold: float = SEMANTIC_THRESHOLD, clusters: int | None = None, embedder=None,
          progress: bool = True) -> AuditResult:
    """Audit ``path`` in one streaming pass (the module docstring says what is kept per row)."""
    from tqdm.auto import tqdm

    from posttrain.data.tokenize import ChatTemplateError, tokenize_sft

    if embed and embed_max < 1:
        raise ValueError(f"embed_max must be >= 1, got {embed_max}")
    result = AuditResult(source=str(path), against=None if against is None else str(against), max_length=max_length)
    eval_index = EvalIndex(against) if against is not None else None
    first_seen: dict[bytes, str] = {}  # digest of the normalised text -> where it first occurs
    near = NearDuplicateIndex(threshold=near_threshold)
    pairs_seen: dict[bytes, str] = {}  # digest of (prompt, chosen, rejected) -> where it first occurs
    tally = _DiversityTally()
    for position, record in enumerate(tqdm(read_records(path), desc=f"auditing {path}", unit="row",
                                           disable=not progress)):
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
        turns = target_turns(row, record.data)
        for prompt, response in turns:
            result.style.add(row.where, prompt, response)
            result.languages.add(row.where, prompt, response)
        result.accuracy.add(row.where, turns, record.data)
        result.kinds[row.kind] += 1
        result.lengths.extend(lengths)
        if max_length is not None and any(n > max_length for n in lengths):
            result.truncated += 1
        tally.add(row)

        # Duplicates: an exact duplicate is not checked again as a near one, and no duplicate is embedded.
        norm = normalize_for_dedup(row.text)
        first = first_seen.setdefault(_digest(norm), row.where)
        if first != row.where:
            result.exact.append((row.where, first))
        else:
            matches = near.add(row.where, norm)
            if matches:
                result.near.append((row.where, matches[0]))
            elif embed:
                tally.add_eligible(position, row, embed_max)

        for kind in sorted({m.kind for m in find_pii(row.text)}):
            result.pii.setdefault(kind, []).append(row.where)
        if any(BOILERPLATE.search(r) for r in row.responses):
            result.boilerplate.append(row.where)
        if row.kind == "pair":
            result.pairs += 1
            prompt, c, r = row.key
            result.chosen_longer += len(c) > len(r)
            swapped = pairs_seen.get(_digest(repr((prompt, r, c))))
            if swapped is not None:
                result.swapped.append((row.where, swapped))
            pairs_seen.setdefault(_digest(repr(row.key)), row.where)
        if eval_index is not None and eval_index.match(row.text):
            result.contaminated.append(row.where)

    _semantic_and_diversity(result, tally, path, embed=embed, embed_max=embed_max, threshold=semantic_threshold,
                            clusters=clusters, embedder=embedder, progress=progress)
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


def _cluster_png(topics: dict) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    clusters = topics["clusters"]
    fig = Figure(figsize=(7, 0.6 + 0.3 * len(clusters)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.barh(range(len(clusters)), [c["share"] for c in clusters], color="tab:green")
    ax.set_yticks(range(len(clusters)), [", ".join(c["top_words"][:3]) or "-" for c in clusters], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"share of the {topics['rows']} embedded rows (effective clusters {topics['effective_clusters']:.1f})")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _embedding_markdown(sem: dict, div: dict) -> list[str]:
    lines = ["## Semantic duplicates", ""]
    if "skipped" in sem:
        lines += [f"skipped ({sem['skipped']})", ""]
    else:
        sampled = f", a uniform sample of {sem['embedded']} of {sem['eligible']} rows" if sem.get("sampled") else ""
        lines += [f"{sem['pairs']} rows with cosine >= {sem['threshold']} to an earlier row (all-MiniLM-L6-v2 embeddings "
                  f"of {sem['embedded']} rows that are not exact or near duplicates{sampled})", ""]
        lines += [f"- {e}" for e in sem["examples"]] + ([""] if sem["examples"] else [])
    d1, d2 = (f"{v:.3f}" if v is not None else "n/a" for v in (div["distinct_1"], div["distinct_2"]))
    lines += ["## Diversity", "", f"distinct-1 {d1}, distinct-2 {d2} over {div['responses']} responses", ""]
    if div["instruction_patterns"]:
        lines += ["Most frequent instruction openings: " + "; ".join(
            f"\"{p['pattern']}\" {p['rows']} ({p['share']:.0%})" for p in div["instruction_patterns"][:5]), ""]
    if div["flagged_patterns"]:
        lines += [f"Flagged, each opening >= {PATTERN_FLAG_SHARE:.0%} of the instructions (a template dominates): "
                  + ", ".join(f'"{p}"' for p in div["flagged_patterns"]), ""]
    topics = div["clusters"]
    if topics:
        lines += [f"{topics['k']} topic clusters (k-means on {topics['rows']} embedded rows), effective number "
                  f"{topics['effective_clusters']:.1f}:", ""]
        lines += [f"- {c['share']:.0%} ({c['rows']} rows): {', '.join(c['top_words']) or '-'}" for c in topics["clusters"]] + [""]
    return lines


def summary_markdown(s: dict) -> str:
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
    lines += consistency_markdown(s["consistency"], s["language"]) + accuracy_markdown(s["accuracy"])
    lines += _embedding_markdown(s["semantic_duplicates"], s["diversity"])
    if "preference" in s:
        p = s["preference"]
        lines += ["## Preference pairs", "", f"{p['pairs']} pairs; chosen is the longer response in {p['chosen_longer_share']:.0%} "
                  "(far from 50% is a length bias a reward model will learn); "
                  f"{p['swapped_pairs']} pairs appear elsewhere with chosen and rejected swapped", ""]
        lines += [f"- {e}" for e in p["swapped_examples"]] + ([""] if p["swapped_examples"] else [])
    if "contamination" in s:
        c = s["contamination"]
        lines += ["## Contamination", "", f"{c['rows']} rows ({c['share']:.1%}) hold at least half of the identifying word {c['ngram']}-grams of a paragraph of {c['against']}", ""]
        lines += [f"- {e}" for e in c["examples"]] + ([""] if c["examples"] else [])
    return "\n".join(lines).rstrip("\n")


def write_reports(result: AuditResult, out_dir: str | Path) -> tuple[Path, Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    md = summary_markdown(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(md + "\n")
    png = base64.b64encode(_histogram_png(result.lengths, result.max_length)).decode() if result.lengths else ""
    body = "".join(f"<p>{html.escape(line)}</p>" if not line.startswith("#") else f"<h2>{html.escape(line.lstrip('# '))}</h2>"
                   for line in md.splitlines() if line)
    img = f'<img alt="token length histogram" src="data:image/png;base64,{png}">' if png else ""
    if summary["diversity"].get("clusters"):
        bars = base64.b64encode(_cluster_png(summary["diversity"]["clusters"])).decode()
        img += f'<img alt="topic cluster sizes" src="data:image/png;base64,{bars}">'
    (out / "report.html").write_text(f"<!doctype html><meta charset='utf-8'><title>posttrain data audit</title>"
                                     f"<body style='font-family:sans-serif;max-width:900px'>{body}{img}</body>")
    return out / "report.md", out / "report.html", out / "summary.json"








