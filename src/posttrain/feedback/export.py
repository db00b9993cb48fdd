"""``posttrain feedback export --db URL --format kto|dpo|sft -o OUT``: turn stored feedback into training data.

Rows are in TRL's conversational formats, the ones ``posttrain kto|dpo|sft`` read; the prompt is the completion's
logged message list, and every row also carries ``feedback_id``, the feedback item it came from (loaders ignore it).

- ``kto`` (``prompt``, ``completion`` [one assistant message], ``label``): each judged completion gets the label of
  its *latest* judgment: thumbs up true, down false; a rating of ``--min-rating`` (default 4) or more true, 2 or
  less false, in between none (neutral); a correction false for the original response; a preference true for the
  preferred completion and false for the other. Each completion's latest correction also yields the corrected
  text with label true.
- ``dpo`` (``prompt``, ``chosen``, ``rejected``): the latest preference between each two completions (they must
  answer the same prompt), and each completion's latest correction (chosen) against its response (rejected).
- ``sft`` (``messages``): each completion's latest correction as the assistant reply; with ``--include-positive``
  also responses whose latest judgment is a thumbs up or a rating of ``--min-rating`` or more.

Earlier feedback replaced by later feedback on the same completion (or pair) is counted as overridden; feedback a
format has no use for is counted too, with the reason.

The rows then go through ``posttrain data clean`` (:mod:`posttrain.curate.clean`): exact and near dedup and PII
redaction by default, or the options of ``--clean-config``. Content filters (boilerplate, broken code, invalid
JSON, reference mismatch) apply only where every response is a target: SFT rows and KTO's desirable rows. DPO pairs
and KTO's undesirable rows keep them off, since there a bad response is the lesson. KTO rows are deduplicated
within each label: a correction and its original are near-duplicates by design, and that contrast is what KTO
learns from.

Writes OUT (the kept rows, JSONL), OUT.raw.jsonl (every row produced) and OUT.rejects.jsonl (each dropped row,
its line in OUT.raw.jsonl and the reason), then prints a summary in which feedback items read = used + skipped and
rows produced = kept + dropped. ``--since ID`` exports feedback with id > ID; the summary prints the next ID.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.curate.clean import CleanConfig, clean
from posttrain.errors import PosttrainError
from posttrain.feedback.store import FeedbackStore

FORMATS = ("kto", "dpo", "sft")
NEGATIVE_MAX_RATING = 2  # ratings at or below this are negative judgments
OVERRIDDEN = "overridden by later feedback on the same completion"


@dataclass
class ExportResult:
    """What an export read, used, produced and kept: ``items_read = used + skipped``, ``produced = kept + dropped``."""

    format: str
    items_by_kind: Counter = field(default_factory=Counter)
    used: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> feedback items that produced no row
    produced: int = 0
    kept: int = 0
    kept_by_label: Counter = field(default_factory=Counter)  # KTO only: "desirable"/"undesirable"
    dropped: Counter = field(default_factory=Counter)  # reason (from clean) -> rows
    pii_redacted: int = 0
    last_id: int = 0  # the newest feedback id read: the next export's --since
    out: str = ""
    raw: str = ""
    rejects: str = ""

    @property
    def items_read(self) -> int:
        return sum(self.items_by_kind.values())

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.items_by_kind.items())) or "none"
        lines = [f"read {self.items_read} feedback items ({kinds}): used {self.used}, skipped "
                 f"{sum(self.skipped.values())}{_reasons(self.skipped)}."]
        labels = (f" ({self.kept_by_label['desirable']} desirable, {self.kept_by_label['undesirable']} undesirable)"
                  if self.format == "kto" else "")
        lines.append(f"produced {self.produced} {self.format} rows: kept {self.kept}{labels}, dropped "
                     f"{sum(self.dropped.values())}{_reasons(self.dropped)}; kept + dropped = produced: checked."
                     + (f" PII redacted in {_rows(self.pii_redacted)} kept." if self.pii_redacted else ""))
        lines.append(f"rows: {self.out}\nevery row produced: {self.raw}\ndropped rows and reasons: {self.rejects}")
        lines.append(f"next export: --since {self.last_id}")
        return "\n".join(lines)


def _rows(n: int) -> str:
    return f"{n} row{'s' * (n != 1)}"


def _reasons(counts: Counter) -> str:
    return f" ({'; '.join(f'{n} {reason}' for reason, n in counts.most_common())})" if counts else ""


# ------------------------------------------------------------------------------------------ feedback -> rows
@dataclass
class _Row:
    item: dict  # the feedback item it comes from
    data: dict
    group: str  # rows are cleaned per group: "desirable"/"undesirable" (KTO), "pairs" (DPO), "sft"


@dataclass
class _Judgment:
    item: dict
    completion: dict  # the judged completion: messages, response
    label: bool | None  # None: a neutral rating


def _prompt(completion: dict) -> list[dict]:
    return [{"role": m.get("role"), "content": m.get("content")} for m in completion["messages"]]


def _reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _neutral(item: dict) -> str:
    return f"rating {item['value']}: neutral (between {NEGATIVE_MAX_RATING} and --min-rating)"


def _latest(items: Iterable[dict], kind: str, key: Callable[[dict], object]) -> dict:
    """The latest item of ``kind`` per ``key`` (items come oldest first, so a later one replaces an earlier one)."""
    return {key(item): item for item in items if item["kind"] == kind}


def _judgments(items: list[dict], min_rating: int) -> dict[str, _Judgment]:
    """Each judged completion's latest judgment (see the module docstring for what each kind says)."""
    latest: dict[str, _Judgment] = {}
    for item in items:
        kind, value, cid = item["kind"], item["value"], item["completion_id"]
        if kind == "thumbs":
            latest[cid] = _Judgment(item, item, value == "up")
        elif kind == "rating":
            label = True if value >= min_rating else False if value <= NEGATIVE_MAX_RATING else None
            latest[cid] = _Judgment(item, item, label)
        elif kind == "correction":
            latest[cid] = _Judgment(item, item, False)
        elif kind == "preference":
            latest[cid] = _Judgment(item, item, True)
            latest[item["other"]["id"]] = _Judgment(item, item["other"], False)
    return latest


def _kto_rows(items: list[dict], min_rating: int, skipped: dict[int, str]) -> list[_Row]:
    rows = []
    judged = _judgments(items, min_rating)
    for j in judged.values():
        if j.label is None:
            skipped[j.item["id"]] = _neutral(j.item)
            continue
        rows.append(_Row(j.item, {"prompt": _prompt(j.completion), "completion": _reply(j.completion["response"]),
                                  "label": j.label}, "desirable" if j.label else "undesirable"))
    for item in _latest(items, "correction", lambda it: it["completion_id"]).values():
        rows.append(_Row(item, {"prompt": _prompt(item), "completion": _reply(item["value"]), "label": True},
                         "desirable"))
    return rows


def _dpo_rows(items: list[dict], skipped: dict[int, str]) -> list[_Row]:
    rows = []
    for item in items:
        if item["kind"] in ("thumbs", "rating"):
            skipped[item["id"]] = f"{item['kind']}: dpo needs two responses to compare (export kto to use it)"
    pairs = _latest(items, "preference", lambda it: frozenset((it["completion_id"], it["other"]["id"])))
    for item in pairs.values():
        if _prompt(item) != _prompt(item["other"]):
            skipped[item["id"]] = "preference between completions of different prompts"
            continue
        rows.append(_Row(item, {"prompt": _prompt(item), "chosen": _reply(item["response"]),
                                "rejected": _reply(item["other"]["response"])}, "pairs"))
    for item in _latest(items, "correction", lambda it: it["completion_id"]).values():
        rows.append(_Row(item, {"prompt": _prompt(item), "chosen": _reply(item["value"]),
                                "rejected": _reply(item["response"])}, "pairs"))
    return rows


def _sft_rows(items: list[dict], min_rating: int, include_positive: bool, skipped: dict[int, str]) -> list[_Row]:
    rows = []
    for item in items:
        if item["kind"] == "preference":
            skipped[item["id"]] = "preference: sft trains on corrections (export dpo or kto to use it)"
        elif item["kind"] in ("thumbs", "rating") and not include_positive:
            skipped[item["id"]] = f"{item['kind']}: sft uses it only with --include-positive"
    for item in _latest(items, "correction", lambda it: it["completion_id"]).values():
        rows.append(_Row(item, {"messages": _prompt(item) + _reply(item["value"])}, "sft"))
    if include_positive:
        for j in _judgments(items, min_rating).values():
            if j.item["kind"] not in ("thumbs", "rating"):
                continue
            if j.label:
                rows.append(_Row(j.item, {"messages": _prompt(j.completion) + _reply(j.completion["response"])}, "sft"))
            else:
                skipped[j.item["id"]] = ("negative judgment: sft has no use for it (export kto)" if j.label is False
                                         else _neutral(j.item))
    return rows


def _cut_off(item: dict) -> bool:
    """The completion (or, for a preference, the other one) was logged after its stream's client disconnected."""
    def cut(completion) -> bool:
        return bool(completion) and (completion.get("sampling") or {}).get("finish_reason") == "disconnected"

    return cut(item) or cut(item.get("other"))


def feedback_rows(items: list[dict], fmt: str, *, min_rating: int = 4,
                  include_positive: bool = False) -> tuple[list[_Row], dict[int, str]]:
    """The rows ``items`` (oldest first) yield in ``fmt``, in feedback order, and why each item that yields none
    was skipped (feedback id -> reason)."""
    skipped: dict[int, str] = {}
    cut = [item for item in items if _cut_off(item)]
    for item in cut:  # the user judged a reply they never saw whole: not a lesson about the full response
        skipped[item["id"]] = "its completion was cut off by a client disconnect"
    items = [item for item in items if not _cut_off(item)]
    if fmt == "kto":
        rows = _kto_rows(items, min_rating, skipped)
    elif fmt == "dpo":
        rows = _dpo_rows(items, skipped)
    else:
        rows = _sft_rows(items, min_rating, include_positive, skipped)
    used = {row.item["id"] for row in rows}
    for item in items:
        if item["id"] not in used:
            skipped.setdefault(item["id"], OVERRIDDEN)
    rows.sort(key=lambda row: row.item["id"])  # stable: a correction's two KTO rows stay in order
    return rows, {i: reason for i, reason in skipped.items() if i not in used}


# ------------------------------------------------------------------------------------------ rows -> files
def _group_config(group: str, base: CleanConfig) -> CleanConfig:
    if group in ("pairs", "undesirable"):  # a bad response is the point of these rows
        return dataclasses.replace(base, boilerplate="keep", broken_code="keep", invalid_json="keep",
                                   reference_mismatch="keep")
    return base


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def clean_rows(rows: list[_Row], out: Path, cfg: CleanConfig, result: ExportResult) -> None:
    """Write OUT.raw.jsonl, clean each group of rows apart, and write the kept rows to OUT and the dropped ones
    (located by their line in OUT.raw.jsonl) to OUT.rejects.jsonl, both in raw order."""
    raw = out.with_name(out.name + ".raw.jsonl")
    rejects_path = out.with_name(out.name + ".rejects.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_jsonl(raw, ({**row.data, "feedback_id": row.item["id"]} for row in rows))
    tokenizer = None
    if cfg.max_length is not None:
        from posttrain.models.loading import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
    kept: list[tuple[int, dict]] = []  # (line in raw, row)
    rejected: list[tuple[int, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for group in dict.fromkeys(row.group for row in rows):
            lines = [i + 1 for i, row in enumerate(rows) if row.group == group]  # 1-based lines of raw
            part = Path(tmp) / f"{group}.jsonl"
            _write_jsonl(part, ({**rows[i - 1].data, "feedback_id": rows[i - 1].item["id"]} for i in lines))
            counts = clean(part, Path(tmp) / f"{group}.kept.jsonl", _group_config(group, cfg), tokenizer=tokenizer, progress=False)
            dropped_lines = set()
            with open(counts["rejects"], encoding="utf-8") as f:
                for line in f:
                    reject = json.loads(line)
                    raw_line = lines[int(reject["where"].rsplit(":", 1)[1]) - 1]
                    dropped_lines.add(raw_line)
                    rejected.append((raw_line, {**reject, "where": f"{raw}:{raw_line}"}))
            with open(counts["out"], encoding="utf-8") as f:
                kept_rows = [json.loads(line) for line in f]
            kept_lines = [i for i in lines if i not in dropped_lines]
            assert len(kept_lines) == len(kept_rows) == counts["kept"], (group, counts)
            kept.extend(zip(kept_lines, kept_rows))
            result.produced += counts["read"]
            result.kept += counts["kept"]
            if group in ("desirable", "undesirable"):
                result.kept_by_label[group] += counts["kept"]
            for reason, n in counts["reasons"].items():
                if reason.startswith("kept"):
                    result.pii_redacted += n
                else:
                    result.dropped[reason] += n
    _write_jsonl(out, (row for _, row in sorted(kept, key=lambda t: t[0])))
    _write_jsonl(rejects_path, (row for _, row in sorted(rejected, key=lambda t: t[0])))
    if not result.kept + sum(result.dropped.values()) == result.produced == len(rows):  # nothing silently lost
        raise AssertionError(f"export: kept {result.kept} + dropped {dict(result.dropped)} != produced "
                             f"{result.produced} ({len(rows)} rows)")
    result.out, result.raw, result.rejects = str(out), str(raw), str(rejects_path)


def export_feedback(store: FeedbackStore, fmt: str, out: str | Path, *, since_id: int = 0, min_rating: int = 4,
                    include_positive: bool = False, clean_config: CleanConfig | None = None) -> ExportResult:
    """Export the feedback with id > ``since_id`` from ``store`` as ``fmt`` rows to ``out`` (module docstring)."""
    if fmt not in FORMATS:
        raise PosttrainError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if not NEGATIVE_MAX_RATING < min_rating <= 5:
        raise PosttrainError(f"--min-rating: expected 3, 4 or 5 (ratings of {NEGATIVE_MAX_RATING} or less are "
                             f"negative), got {min_rating}")
    if include_positive and fmt != "sft":
        raise PosttrainError(f"--include-positive: only for --format sft (kto already uses positive judgments, "
                             f"dpo needs pairs), got --format {fmt}")
    items = list(store.iter_feedback(since_id))
    result = ExportResult(fmt, items_by_kind=Counter(item["kind"] for item in items),
                          last_id=items[-1]["id"] if items else since_id)
    rows, skipped = feedback_rows(items, fmt, min_rating=min_rating, include_positive=include_positive)
    result.skipped = Counter(skipped.values())
    result.used = len(items) - len(skipped)
    assert result.used == len({row.item["id"] for row in rows}), "every item is used or skipped, never both"
    clean_rows(rows, Path(out), clean_config or CleanConfig(), result)
    return result

