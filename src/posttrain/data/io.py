"""Read raw rows from a data file, one :class:`Record` per row, each located the way an editor would.

Rows come back as plain dicts, not yet validated: deciding whether a row is a usable SFT example is
:mod:`posttrain.data.formats`' job. A row that cannot even be parsed (malformed JSON, invalid UTF-8, a
JSON value that is not an object) is still yielded, as a Record with ``error`` set, so the caller can
report every bad row at once instead of stopping at the first. Problems with the file as a whole
(missing, unknown format, unreadable Parquet) raise :class:`~posttrain.errors.DataError` at once.

Memory does not grow with the file, except for JSON arrays:

- JSONL (and a ``.json`` file holding JSONL) is read one line at a time;
- CSV is checked for invalid UTF-8 in one line-by-line pass when :func:`read_records` is called (so that error is
  still raised at once), then parsed one row at a time;
- Parquet and saved datasets are read ``_BATCH_ROWS`` rows at a time (a saved dataset is memory-mapped Arrow);
- a ``.json`` file holding one JSON array is parsed whole, so its rows are all in memory: a JSON array cannot be
  split into rows without parsing it. Convert large arrays to JSONL.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import DataError

SUPPORTED_FORMATS = ".jsonl, .json, .parquet, .csv, or a directory saved with datasets' save_to_disk"

_BATCH_ROWS = 1024  # rows per Arrow batch when reading columnar formats; bounds memory, not results
_UTF8_BOM = b"\xef\xbb\xbf"


@dataclass
class Record:
    """One raw row: its location, and either its data or why it could not be parsed."""

    where: str  # "train.jsonl:12" (1-based file line) or "train.parquet row 5" (1-based row)
    data: dict | None
    error: str | None


def read_records(path: str | Path) -> Iterator[Record]:
    """Yield every row of ``path``; the format is chosen by extension, or a saved dataset directory.

    ``where`` uses the path exactly as the user gave it, so error messages match what they typed.
    The file-level checks run on the call itself, not on the first ``next()``, so a missing file
    fails where the user asked for it.
    """
    shown = os.fspath(path)
    p = Path(path)
    if not p.exists():
        raise DataError(shown, "file not found")
    if p.is_dir():
        return _read_saved_dataset(p, shown)
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(p, shown)
    if suffix == ".json":
        return _read_json(p, shown)
    if suffix == ".parquet":
        return _read_parquet(p, shown)
    if suffix == ".csv":
        return _read_csv(p, shown)
    raise DataError(
        shown, f"unsupported data format {suffix or '(no extension)'!r}; expected {SUPPORTED_FORMATS}"
    )


def _read_jsonl(p: Path, shown: str) -> Iterator[Record]:
    # Read and decode line by line: memory stays one line whatever the file size, and one bad byte costs one
    # row, not the whole file. Binary mode splits on b"\n" only, as a text editor numbers lines.
    with p.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if lineno == 1:
                line = line.removeprefix(_UTF8_BOM)  # editors on Windows write one; it is not data
            if not line.strip():
                continue
            where = f"{shown}:{lineno}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Record(where, None, f"invalid UTF-8 at byte {e.start + 1} of the line ({e.reason})")
                continue
            yield _parse_json_object(text, where)


def _parse_json_object(text: str, where: str) -> Record:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return Record(where, None, f"malformed JSON: {e}")
    if not isinstance(value, dict):
        return Record(where, None, f"expected a JSON object per row, got {_json_kind(value)}")
    return Record(where, value, None)


def _read_json(p: Path, shown: str) -> Iterator[Record]:
    # A .json file holding one object per line is common (it is what many exporters write), so the
    # first character decides: '[' is an array of rows, parsed whole; anything else is streamed as JSONL.
    if not _starts_with_array(p):
        return _read_jsonl(p, shown)
    body = p.read_bytes().removeprefix(_UTF8_BOM)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        line = body[: e.start].count(b"\n") + 1
        raise DataError(f"{shown}:{line}", f"invalid UTF-8 ({e.reason})") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{shown}:{e.lineno}", f"malformed JSON: {e}") from None
    assert isinstance(rows, list)  # it starts with '[' and parsed, so it is an array
    return (_array_row(row, f"{shown} row {i}") for i, row in enumerate(rows, start=1))


def _starts_with_array(p: Path) -> bool:
    """Whether the first character after a BOM and whitespace is '[', reading only as far as that character."""
    with p.open("rb") as f:
        head = f.read(len(_UTF8_BOM)).removeprefix(_UTF8_BOM)
        while True:
            head = head.lstrip()
            if head:
                return head.startswith(b"[")
            head = f.read(1 << 16)
            if not head:
                return False


def _array_row(row: object, where: str) -> Record:
    if isinstance(row, dict):
        return Record(where, row, None)
    return Record(where, None, f"expected a JSON object per row, got {_json_kind(row)}")


def _read_parquet(p: Path, shown: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(p)
    except (pa.ArrowException, OSError) as e:
        raise DataError(shown, f"cannot read Parquet file: {e}") from None
    return _numbered_rows(parquet.iter_batches(batch_size=_BATCH_ROWS), shown)


def _numbered_rows(batches: Iterator, shown: str) -> Iterator[Record]:
    """Rows of Arrow record batches or tables, located as 1-based ``row N``."""
    row = 0
    for batch in batches:
        for data in batch.to_pylist():
            row += 1
            yield Record(f"{shown} row {row}", data, None)


def _read_csv(p: Path, shown: str) -> Iterator[Record]:
    # Invalid UTF-8 is a file-level error, raised on the call like the others: one line-by-line pass finds
    # it without holding the file. A multi-byte UTF-8 sequence never contains b"\n", so decoding line by
    # line accepts exactly what decoding the whole file would.
    with p.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                (line.removeprefix(_UTF8_BOM) if lineno == 1 else line).decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{shown}:{lineno}", f"invalid UTF-8 ({e.reason})") from None
    return _csv_rows(p, shown)


def _csv_rows(p: Path, shown: str) -> Iterator[Record]:
    # csv.reader rather than DictReader: DictReader skips blank lines and reports the line a row
    # *ends* on, but a quoted field may span lines and users look for where the row starts.
    with p.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header: list[str] | None = None
        last_line = 0
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:  # e.g. a NUL byte; the csv module cannot resync after it
                raise DataError(f"{shown}:{reader.line_num}", f"malformed CSV: {e}") from None
            start, last_line = last_line + 1, reader.line_num
            if not cells:
                continue
            if header is None:
                header = cells
                continue
            where = f"{shown}:{start}"
            if len(cells) != len(header):
                yield Record(
                    where, None, f"expected {len(header)} CSV columns (as in the header), got {len(cells)}"
                )
            else:
                yield Record(where, dict(zip(header, cells)), None)


def _read_saved_dataset(p: Path, shown: str) -> Iterator[Record]:
    import datasets

    if not ((p / "dataset_dict.json").exists() or (p / "state.json").exists()):
        raise DataError(
            shown,
            f"directory is not a saved dataset (no state.json or dataset_dict.json); expected {SUPPORTED_FORMATS}",
        )
    loaded = datasets.load_from_disk(str(p))
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if len(splits) == 1:
            loaded = loaded[splits[0]]
        elif "train" in loaded:
            loaded = loaded["train"]
        else:
            raise DataError(
                shown, f"saved DatasetDict has splits {splits} and no 'train' split; save the one to train on"
            )
    return _numbered_rows(loaded.with_format("arrow").iter(batch_size=_BATCH_ROWS), shown)


def _json_kind(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
