"""What the dashboard reads from a runs folder: the runs under it, their metrics as they grow, and their reports.

Pure file reading, no web framework: every function takes the root and a run's id (its path relative to the root,
``/``-separated) and returns plain data. A run is a folder that holds one of:

- ``metrics.jsonl`` or ``run.json``: a training run of any stage (``sft``, ``dpo``, ``kto``, ``rm``, ``grpo``,
  ``ppo``; the loop's candidates too). ``run.json`` (written by the engine) gives the status, the planned steps and
  the process; older runs without it are ``finished`` when their weights are saved, else ``unknown``;
- ``summary.json`` with ``stages``: a pipeline (``posttrain pipeline``);
- ``compare.json``: a comparison (``posttrain compare``);
- ``summary.json`` with ``rows`` and a ``report.md``: a data audit (``posttrain data audit``).

Folders that never hold a run (checkpoints, TensorBoard events, the pipeline's resolved configs, registry
versions) are not walked into.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import socket
import time
from pathlib import Path

from posttrain.errors import PosttrainError

SKIP_DIRS = {"checkpoints", "tensorboard", "versions", ".pipeline", "evals", "__pycache__", "node_modules"}
MAX_DEPTH = 6
MAX_CHUNK_BYTES = 4 << 20  # metrics returned per request at most (the page asks again for the rest)
TAIL_BYTES = 256 << 10  # how much of a metrics file's end is read for a run's summary
STAGES = {"SFTObjective": "sft", "DPOObjective": "dpo", "KTOObjective": "kto", "RewardObjective": "rm",
          "GRPOObjective": "grpo", "PPOObjective": "ppo"}
WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
REPORT_FILES = {"pipeline": "report", "compare": "compare", "audit": "report", "train": "report"}


class NotFound(PosttrainError):
    pass


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _kind(folder: Path, names: set[str]) -> str | None:
    if "compare.json" in names:
        return "compare"
    if "summary.json" in names:
        summary = _read_json(folder / "summary.json") or {}
        if "stages" in summary:
            return "pipeline"
        if "rows" in summary and "report.md" in names:
            return "audit"
    if "metrics.jsonl" in names or "run.json" in names:
        return "train"
    return None


def find_runs(root: Path) -> list[tuple[str, str]]:
    """(run id, kind) of every run under ``root``, sorted by id."""
    found = []
    root = root.resolve()
    if not root.is_dir():
        return found

    def walk(folder: Path, depth: int) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        names = {e.name for e in entries if e.is_file()}
        kind = _kind(folder, names)
        if kind is not None:
            found.append((folder.relative_to(root).as_posix() or ".", kind))
        if depth >= MAX_DEPTH:
            return
        for e in entries:
            if e.is_dir(follow_symlinks=False) and e.name not in SKIP_DIRS and not e.name.startswith("."):
                walk(Path(e.path), depth + 1)

    walk(root, 0)
    return sorted(found)


def run_dir(root: Path, run_id: str) -> Path:
    """The folder of ``run_id``, which must lie inside ``root`` (no ``..`` or links out of it)."""
    root = root.resolve()
    folder = (root / run_id).resolve()
    if folder != root and root not in folder.parents:
        raise NotFound(f"run {run_id!r}: not under {root}")
    if not folder.is_dir() or kind_of(folder) is None:
        raise NotFound(f"run {run_id!r}: no such run under {root}")
    return folder


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _tail_rows(path: Path) -> list[dict]:
    """The rows in the last TAIL_BYTES of a metrics file (the first, maybe partial, line dropped)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - TAIL_BYTES))
            data = f.read()
    except OSError:
        return []
    lines = data.split(b"\n")
    if size > TAIL_BYTES:
        lines = lines[1:]
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _process_alive(status: dict) -> bool | None:
    """Whether the run's process still runs (None when it ran on another host: unknown from here)."""
    if status.get("host") != socket.gethostname() or not isinstance(status.get("pid"), int):
        return None
    try:
        os.kill(status["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_CACHE: dict[Path, tuple[tuple, dict]] = {}  # run folder -> (its files' (mtime, size), summary): unchanged runs are not re-read


def _stamp(folder: Path) -> tuple:
    out = []
    for name in ("metrics.jsonl", "run.json", "posttrain_config.json", *WEIGHTS):
        try:
            st = (folder / name).stat()
            out.append((name, st.st_mtime_ns, st.st_size))
        except OSError:
            pass
    return tuple(out)


def train_summary(folder: Path, now: float | None = None) -> dict:
    """Status, progress, ETA and last metrics of a training run (re-read only when one of its files changed; a
    running run's process is checked every time)."""
    now = time.time() if now is None else now
    stamp = _stamp(folder)
    cached = _CACHE.get(folder)
    if cached is None or cached[0] != stamp:
        cached = (stamp, _read_summary(folder))
        _CACHE[folder] = cached
    summary = dict(cached[1])
    status = summary.pop("_status")
    if summary["status"] == "running" and _process_alive(status) is False:
        summary["status"], summary["eta_s"] = "interrupted", None
    summary["age_s"] = now - summary["updated"]
    return summary


def _read_summary(folder: Path) -> dict:
    status = _read_json(folder / "run.json") or {}
    config = _read_json(folder / "posttrain_config.json") or {}
    rows = _tail_rows(folder / "metrics.jsonl")
    train = [r for r in rows if "train/loss" in r]
    step = max((r.get("step", 0) for r in train), default=0)
    total = status.get("total_steps") or (config.get("max_steps") if (config.get("max_steps") or 0) > 0 else None)
    state = status.get("status")
    if state is None:
        state = "finished" if any((folder / w).exists() for w in WEIGHTS) else "unknown"
    eta = None
    if state == "running" and total and step and step < total:
        recent = [r["train/step_seconds"] for r in train[-20:] if _finite(r.get("train/step_seconds"))]
        if recent:
            eta = max(0.0, (total - step) * sum(recent) / len(recent))
    last = {}
    for r in rows:  # the newest value of every numeric metric
        last.update({k: v for k, v in r.items() if k != "step" and _finite(v)})
    try:
        updated = max(p.stat().st_mtime for p in (folder / "metrics.jsonl", folder / "run.json") if p.exists())
    except ValueError:
        updated = folder.stat().st_mtime
    stage = STAGES.get(status.get("objective", ""), status.get("objective", "").lower().removesuffix("objective"))
    return {"status": state, "stage": stage or _guess_stage(config), "step": step, "total_steps": total,
            "eta_s": eta, "started": status.get("started"), "ended": status.get("ended"), "updated": updated,
            "reason": status.get("reason"), "last": last, "method": config.get("method"),
            "model": config.get("model"), "_status": status}


def _guess_stage(config: dict) -> str:
    """The stage of a run from before run.json existed, from keys only one stage has."""
    for key, stage in (("rewards", "grpo"), ("kl_coef", "ppo"), ("desirable_weight", "kto"), ("beta", "dpo")):
        if key in config:
            return stage
    return "sft" if config else ""


def summarize(folder: Path, run_id: str, kind: str) -> dict:
    """One row of the runs table: ``folder`` as :func:`find_runs` found it (no second walk of it)."""
    entry = {"id": run_id, "kind": kind, "name": folder.name,
             "report": report_path(folder, kind) is not None}
    if kind == "train":
        entry.update(train_summary(folder))
    else:
        summary = _read_json(folder / ("compare.json" if kind == "compare" else "summary.json")) or {}
        entry.update(status="finished", updated=folder.stat().st_mtime, stage=kind)
        if kind == "pipeline":
            entry["stages"] = [s.get("name") for s in summary.get("stages", []) if isinstance(s, dict)]
            entry["stopped_at"] = summary.get("stopped_at")
            entry["status"] = "gate failed" if summary.get("stopped_at") else "finished"
        elif kind == "audit":
            entry["rows"] = summary.get("rows")
    return entry


def list_runs(root: Path) -> list[dict]:
    root = root.resolve()
    return [summarize(root / run_id, run_id, kind) for run_id, kind in find_runs(root)]


def read_metrics(root: Path, run_id: str, offset: int = 0) -> dict:
    """The metrics rows written since byte ``offset`` of ``metrics.jsonl`` (complete lines only), the offset to
    ask from next, whether more is waiting, and ``reset`` when the file is shorter than ``offset`` (a resumed run
    rewrote it: the page starts over from the rows returned)."""
    path = run_dir(root, run_id) / "metrics.jsonl"
    if offset < 0:
        raise ValueError(f"offset: expected a byte offset >= 0, got {offset}")
    if not path.exists():
        return {"rows": [], "offset": 0, "more": False, "reset": offset > 0}
    with path.open("rb") as f:
        size = f.seek(0, 2)
        reset = size < offset
        start = 0 if reset else offset
        f.seek(start)
        data = f.read(MAX_CHUNK_BYTES)
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next request
    rows = []
    for line in data[:end].splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append({k: v for k, v in row.items() if _finite(v)})
    return {"rows": rows, "offset": start + end, "more": start + end < size and end > 0, "reset": reset}


def report_path(folder: Path, kind: str) -> Path | None:
    """The run's report: its self-contained ``.html`` when there is one, else its Markdown."""
    stem = REPORT_FILES[kind]
    for suffix in (".html", ".md"):
        if (folder / (stem + suffix)).is_file():
            return folder / (stem + suffix)
    return None


_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def _inline_images(markdown_text: str, folder: Path) -> str:
    """Replace ``![alt](file.png)`` of a PNG inside the run's folder by a data: URI (the report page may load
    nothing else)."""

    def repl(m: re.Match) -> str:
        target = (folder / m.group(2)).resolve()
        if target.suffix.lower() != ".png" or folder not in target.parents or not target.is_file():
            return m.group(0)
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(target.read_bytes()).decode()})"

    return _IMAGE.sub(repl, markdown_text)


def kind_of(folder: Path) -> str | None:
    return _kind(folder, {p.name for p in folder.iterdir() if p.is_file()})


def render_report(root: Path, run_id: str) -> str:
    """The run's report as one HTML page (Markdown rendered with tables; PNGs inlined)."""
    folder = run_dir(root, run_id)
    path = report_path(folder, kind_of(folder))
    if path is None:
        raise NotFound(f"run {run_id!r}: no report")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".html":
        return text
    import markdown

    body = markdown.markdown(_inline_images(text, folder.resolve()), extensions=["tables", "fenced_code"])
    return ("<!doctype html><meta charset='utf-8'><style>body{font:14px/1.45 system-ui,sans-serif;margin:16px;"
            "color:#1d2433}table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #d0d5dd;padding:3px 8px;"
            "text-align:left}th{background:#f2f4f7}img{max-width:100%}code,pre{background:#f5f5f7;font-size:12px}"
            "pre{padding:8px;overflow:auto}</style>" + body)
