"""``posttrain data clean FILE -o OUT [--config clean.yaml] [--against EVAL]``: keep the rows worth training on.

Applies, in this order, the filters selected in the config (defaults below), each a check from the audit
(:mod:`posttrain.curate.audit`), so what ``audit`` reports is what ``clean`` removes:

1. invalid rows (unparseable, or rejected by the trainers' own validation);
2. rows longer than ``max_length`` tokens (when set);
3. contamination: rows holding at least half of some ``--against`` eval row's identifying word 8-grams of one paragraph (audit.EvalIndex);
4. exact duplicates (after case/whitespace normalisation), then near duplicates (MinHash LSH); the first
   occurrence is kept; then, with ``semantic_dedup: true``, semantic duplicates (cosine >= ``semantic_threshold``
   between all-MiniLM-L6-v2 sentence embeddings, :mod:`posttrain.curate.embed`). Semantic dedup is off by default:
   embedding runs at 7-50 rows/s on a CPU core (256- to 40-token rows), and each kept row holds a 1.5 KB embedding
   in memory;
5. boilerplate/refusal responses (``boilerplate: drop``);
6. broken code blocks (``broken_code: drop``): an unclosed fence, a ```python block that ``ast.parse`` rejects, a
   ```json block that is not JSON (:mod:`posttrain.curate.accuracy`; nothing is executed);
7. invalid JSON where JSON is expected (``invalid_json: drop``): the prompt asks for JSON, or the response starts
   like JSON, and it does not parse;
8. responses contradicting the row's ``reference`` (else ``answer``, else ``ground_truth``) column
   (``reference_mismatch: drop``): a different final number, or a short textual reference missing;
9. languages (``languages: [en, ...]``; default: all kept): rows whose prompt or response is confidently detected
   (:mod:`posttrain.curate.consistency`, offline ``py3langid``) in another language; texts too short to tell are kept;
10. PII: ``redact`` (default: e-mails, phones, keys, cards and IPs replaced by ``[EMAIL]``...), ``drop`` or ``keep``.

Writes OUT (the kept rows, as JSONL, in input order) and ``OUT.rejects.jsonl``: one line per dropped row with its
location, the reason and the row itself. Nothing is silently lost: kept + rejected = rows read, checked before the
command reports success.

Memory: rows are streamed (:func:`posttrain.data.io.read_records`) and written as they are decided, so no row is
held after its turn. What grows with the input is the dedup state: a 16-byte digest per distinct row and about
1 KB per row kept by the near-duplicate index (:class:`~posttrain.curate.dedup.NearDuplicateIndex`), whatever the
rows' length; with ``semantic_dedup``, a 1.5 KB embedding per kept row; with ``--against``, the eval set's n-grams.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from posttrain.config import opt
from posttrain.errors import ConfigError


@dataclass
class CleanConfig:
    max_length: int | None = opt(None, "Drop rows longer than this many tokens (null: keep all lengths).")
    exact_dedup: bool = opt(True, "Drop exact duplicates (after case/whitespace normalisation); the first is kept.")
    near_dedup: bool = opt(True, "Drop near duplicates (MinHash LSH over word 5-grams); the first is kept.")
    near_threshold: float = opt(0.8, "Estimated Jaccard similarity at which two rows are near duplicates.")
    semantic_dedup: bool = opt(False, "Drop semantic duplicates (sentence-embedding cosine >= semantic_threshold); the first is kept. Off by default: slow on CPU (7-50 rows/s per core).")
    semantic_threshold: float = opt(0.9, "Cosine similarity of all-MiniLM-L6-v2 embeddings at which two rows are semantic duplicates.")
    boilerplate: Literal["drop", "keep"] = opt("drop", "Rows whose responses contain refusal/'As an AI language model' boilerplate.")
    broken_code: Literal["drop", "keep"] = opt("drop", "Rows with an unclosed code fence, a ```python block that does not parse, or a ```json block that is not JSON.")
    invalid_json: Literal["drop", "keep"] = opt("drop", "Rows whose response should be JSON (the prompt asks for it, or it starts with { or [) but does not parse.")
    reference_mismatch: Literal["drop", "keep"] = opt("drop", "Rows whose response contradicts their reference/answer/ground_truth column.")
    languages: list[str] | None = opt(None, "Keep only rows in these languages (ISO 639-1 codes, e.g. [en, fr]); null keeps all. Texts too short to tell are kept.")
    pii: Literal["redact", "drop", "keep"] = opt("redact", "Rows with e-mails, phones, API keys, card numbers or IPs: redact them, drop the row, or keep it.")
    model: str = opt("smollm2-135m", "Whose tokenizer measures max_length.")


def load_clean_config(path: str | None) -> CleanConfig:
    from posttrain.config import build_config

    return build_config(CleanConfig, path, None, "clean options")


def _redact_value(value, kinds=None):
    from posttrain.curate.pii import redact

    if isinstance(value, str):
        return redact(value, kinds)
    if isinstance(value, list):
        return [_redact_value(v, kinds) for v in value]
    if isinstance(value, dict):
        return {k: _redact_value(v, kinds) for k, v in value.items()}
    return value


def _with_embeddings(records: Iterable, enabled: bool, batch: int = 64) -> Iterator[tuple]:
    """``(record, embedding of its row's text)`` in input order, embedded ``batch`` rows at a time; the
    embedding is None when not ``enabled`` or for a row that does not parse (the loop rejects it anyway)."""
    if not enabled:
        yield from ((record, None) for record in records)
        return
    from posttrain.curate.embed import Embedder
    from posttrain.curate.rows import parse_row

    embedder = Embedder(progress=False)

    def flush(pending: list) -> Iterator[tuple]:
        texts: dict[int, str] = {}
        for i, record in enumerate(pending):
            if record.error is None:
                try:
                    texts[i] = parse_row(record.where, record.data).text
                except ValueError:
                    pass
        vectors = dict(zip(texts, embedder.encode(list(texts.values())))) if texts else {}
        yield from ((record, vectors.get(i)) for i, record in enumerate(pending))

    pending: list = []
    for record in records:
        pending.append(record)
        if len(pending) == batch:
            yield from flush(pending)
            pending = []
    yield from flush(pending)


def clean(path: str | Path, out: str | Path, cfg: CleanConfig, *, against: str | Path | None = None,
          tokenizer=None, progress: bool = True) -> dict:
    """Filter ``path`` into ``out`` and ``out.rejects.jsonl``; returns counts by reason (see module docstring)."""
    from posttrain.curate.accuracy import check_row
    from posttrain.curate.consistency import known_languages, language_outside, target_turns
    from posttrain.curate.contamination import CONTAMINATION_N, EvalIndex
    from posttrain.curate.dedup import NearDuplicateIndex, normalize_for_dedup
    from posttrain.curate.pii import find_pii
    from posttrain.curate.rows import BOILERPLATE, parse_row
    from posttrain.data.io import read_records
    from posttrain.data.tokenize import ChatTemplateError, tokenize_sft

    if cfg.languages is not None:
        unknown = sorted(set(cfg.languages) - set(known_languages()))
        if unknown:
            raise ConfigError(f"languages: unknown code(s) {', '.join(unknown)}; expected ISO 639-1 codes such as en, "
                              f"fr, de, es, zh (py3langid knows {len(known_languages())})")
    eval_index = EvalIndex(against) if against is not None else None
    out = Path(out)
    rejects_path = out.with_name(out.name + ".rejects.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    seen: set[bytes] = set()
    near = NearDuplicateIndex(threshold=cfg.near_threshold) if cfg.near_dedup else None
    semantic = None
    if cfg.semantic_dedup:
        if not 0.0 < cfg.semantic_threshold <= 1.0:
            raise ConfigError(f"semantic_threshold: expected a cosine in (0, 1], got {cfg.semantic_threshold}")
        from posttrain.curate.embed import SemanticDuplicateIndex

        semantic = SemanticDuplicateIndex(cfg.semantic_threshold)
    read = kept = 0
    with out.open("w", encoding="utf-8") as keep_f, rejects_path.open("w", encoding="utf-8") as rej_f:
        def reject(where: str, reason: str, row, **detail) -> None:
            counts[reason] = counts.get(reason, 0) + 1
            rej_f.write(json.dumps({"where": where, "reason": reason, **detail, "row": row}, ensure_ascii=False) + "\n")

        from tqdm.auto import tqdm

        records = tqdm(read_records(path), desc=f"cleaning {path}", unit="row", disable=not progress, mininterval=1.0)
        for record, embedding in _with_embeddings(records, semantic is not None):
            read += 1
            if record.error is not None:
                reject(record.where, f"invalid: {record.error}", None)
                continue
            try:
                row = parse_row(record.where, record.data)
                if cfg.max_length is not None and tokenizer is not None:
                    if any(len(tokenize_sft(e, tokenizer).input_ids) > cfg.max_length for e in row.examples):
                        reject(record.where, f"longer than {cfg.max_length} tokens", record.data)
                        continue
            except (ValueError, ChatTemplateError) as e:
                reject(record.where, f"invalid: {e}", record.data)
                continue
            hit = eval_index.match(row.text) if eval_index else None
            if hit:
                reject(record.where, f"contaminated: holds half or more of the word {CONTAMINATION_N}-grams of a paragraph of "
                       f"{against}", record.data, eval_row=hit[0], share=round(hit[1], 3))
                continue
            norm = normalize_for_dedup(row.text)
            digest = hashlib.blake2b(norm.encode(), digest_size=16).digest()
            if cfg.exact_dedup and digest in seen:
                reject(record.where, "exact duplicate", record.data)
                continue
            seen.add(digest)
            if near is not None and near.add(read, norm):  # the row number: a smaller key to keep than `where`
                reject(record.where, "near duplicate", record.data)
                continue
            if semantic is not None and semantic.add([record.where], embedding[None])[0] is not None:
                reject(record.where, "semantic duplicate", record.data)
                continue
            if cfg.boilerplate == "drop" and any(BOILERPLATE.search(r) for r in row.responses):
                reject(record.where, "boilerplate/refusal", record.data)
                continue
            turns = target_turns(row, record.data)
            if "drop" in (cfg.broken_code, cfg.invalid_json, cfg.reference_mismatch):
                checks = check_row(turns, record.data)
                problem = next((f"{reason}: {detail}" for reason, detail, setting in (
                    ("broken code", checks.broken_code, cfg.broken_code),
                    ("invalid JSON", checks.invalid_json, cfg.invalid_json),
                    ("contradicts reference", checks.reference, cfg.reference_mismatch),
                ) if detail is not None and setting == "drop"), None)
                if problem is not None:
                    reject(record.where, problem, record.data)
                    continue
            if cfg.languages is not None:
                language = language_outside(turns, cfg.languages)
                if language is not None:
                    reject(record.where, f"language: {language}, not in languages ({', '.join(cfg.languages)})", record.data)
                    continue
            data = record.data
            if cfg.pii != "keep" and find_pii(row.text):
                if cfg.pii == "drop":
                    reject(record.where, "PII", record.data)
                    continue
                data = _redact_value(data)
                counts["kept, PII redacted"] = counts.get("kept, PII redacted", 0) + 1
            keep_f.write(json.dumps(data, ensure_ascii=False) + "\n")
            kept += 1
    rejected = sum(v for k, v in counts.items() if not k.startswith("kept"))
    if kept + rejected != read:  # the promise: nothing silently lost
        raise AssertionError(f"clean: kept {kept} + rejected {rejected} != read {read}")
    return {"read": read, "kept": kept, "rejected": rejected, "reasons": counts, "out": str(out), "rejects": str(rejects_path)}
