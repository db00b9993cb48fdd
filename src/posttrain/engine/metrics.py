"""Metrics sinks: a JSONL file (one object per logged step) and TensorBoard, written by the main process."""

from __future__ import annotations

import json
import math
from pathlib import Path


def write_status(output_dir: Path, **fields) -> None:
    """Merge ``fields`` into ``run.json``, the run's status file (replaced atomically): what ``posttrain ui`` reads
    to show a run's progress and ETA. ``status`` is ``running``, ``finished``, ``stopped`` (an RL guard or a
    stage's own stop) or ``diverged``; a ``running`` run whose process is gone is shown as interrupted."""
    import os
    import time

    path = output_dir / "run.json"
    try:
        status = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        status = {}
    status.update(fields, updated=time.time())
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(status, indent=2))
    os.replace(tmp, path)


class MetricsLogger:
    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / "metrics.jsonl"
        if resume_step and path.exists():
            # A resumed run rewrites history after its checkpoint, so the log has each step once.
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        elif path.exists():
            path.unlink()
        self._file = path.open("a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": step, **{f"{prefix}/{k}": _clean(v) for k, v in values.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _clean(v: float) -> float | str:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def plot_metrics(output_dir: Path) -> Path | None:
    """Draw train (and eval) loss and the learning rate from metrics.jsonl into ``loss.png``."""
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    train = [(r["step"], r["train/loss"]) for r in rows if isinstance(r.get("train/loss"), float)]
    evals = [(r["step"], r["eval/loss"]) for r in rows if isinstance(r.get("eval/loss"), float)]
    lrs = [(r["step"], r["train/lr"]) for r in rows if "train/lr" in r]
    if not train:
        return None
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=[3, 1])
    ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", ms=4)
    ax.set_ylabel("loss")
    ax.set_yscale("log" if max(v for _, v in train) / max(min(v for _, v in train), 1e-9) > 20 else "linear")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(output_dir.name)
    ax_lr.plot(*zip(*lrs), color="gray", lw=1)
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = output_dir / "loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
