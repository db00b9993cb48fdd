"""``posttrain data clean FILE -o OUT [--config clean.yaml] [--against EVAL]``: keep the rows worth training on.

Applies, in this order, the filters selected in the config (defaults below), each a check from the audit
(:mod:`posttrain.data.audit`), so what ``audit`` reports is what ``clean`` removes:

1. invalid rows (unparseable, or rejected by the trainers' own validation);
2. rows longer than ``max_length`` tokens (when set);
3. contamination: rows sharing a word 8-gram with the ``--against`` eval set;
4. exact duplicates (after case/whitespace normalisation), then near duplicates (MinHash LSH); the first
   occurrence is kept;
5. boilerplate/refusal responses (``boilerplate: drop``);
6. PII: ``redact`` (default: e-mails, phones, keys, cards and IPs replaced by ``[EMAIL]``...), ``drop`` or ``keep``.

Writes OUT (the kept rows, as JSONL, in input order) and ``OUT.rejects.jsonl``: one line per dropped row with its
location, the reason and the row itself. Nothing is silently lost: kept + rejected = rows read, checked before the
command reports success.
"""

from __future__ import annotations

import hashlib
import json
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
    boilerplate: Literal["drop", "keep"] = opt("drop", "Rows whose responses contain refusal/'As an AI language model' boilerplate.")
    pii: Literal["redact", "drop", "keep"] = opt("redact", "Rows with e-mails, phones, API keys, card numbers or IPs: redact them, drop the row, or keep it.")
    model: str = opt("smollm2-135m", "Whose tokenizer measures max_length.")


def load_clean_config(path: str | None) -> CleanConfig:
    from posttrain.config import _build

    if path is None:
        return CleanConfig()
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of clean options")
    return _build(CleanConfig, values)


def _redact_value(value, kinds=None):
    from posttrain.data.pii import redact

    if isinstance(value, str):
        return redact(value, kinds)
    if isinstance(value, list):
        return [_redact_value(v, kinds) for v in value]
    if isinstance(value, dict):
        return {k: _redact_value(v, kinds) for k, v in value.items()}
    return value


def clean(path: str | Path, out: str | Path, cfg: CleanConfig, *, against: str | Path | None = None,
          tokenizer=None) -> dict:
    """Filter ``path`` into ``out`` and ``out.rejects.jsonl``; returns counts by reason (see module docstring)."""
    from posttrain.data.audit import BOILERPLATE, CONTAMINATION_N, _ngrams, eval_ngrams, parse_row
    from posttrain.data.dedup import NearDuplicateIndex, normalize_for_dedup
    from posttrain.data.io import read_records
    from posttrain.data.pii import find_pii
    from posttrain.data.tokenize import ChatTemplateError, tokenize_sft

    eval_grams = eval_ngrams(against) if against is not None else set()
    out = Path(out)
    rejects_path = out.with_name(out.name + ".rejects.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    seen: set[bytes] = set()
    near = NearDuplicateIndex(threshold=cfg.near_threshold) if cfg.near_dedup else None
    read = kept = 0
    with out.open("w", encoding="utf-8") as keep_f, rejects_path.open("w", encoding="utf-8") as rej_f:
        def reject(where: str, reason: str, row) -> None:
            counts[reason] = counts.get(reason, 0) + 1
            rej_f.write(json.dumps({"where": where, "reason": reason, "row": row}, ensure_ascii=False) + "\n")

        for record in read_records(path):
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
            if eval_grams and _ngrams(row.text, CONTAMINATION_N) & eval_grams:
                reject(record.where, f"contaminated: shares a word {CONTAMINATION_N}-gram with {against}", record.data)
                continue
            norm = normalize_for_dedup(row.text)
            digest = hashlib.blake2b(norm.encode(), digest_size=16).digest()
            if cfg.exact_dedup and digest in seen:
                reject(record.where, "exact duplicate", record.data)
                continue
            seen.add(digest)
            if near is not None and near.add(record.where, norm):
                reject(record.where, "near duplicate", record.data)
                continue
            if cfg.boilerplate == "drop" and any(BOILERPLATE.search(r) for r in row.responses):
                reject(record.where, "boilerplate/refusal", record.data)
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
