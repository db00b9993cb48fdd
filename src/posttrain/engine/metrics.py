"""Metrics sinks: a JSONL file (one object per logged step) and TensorBoard, written by the main process."""

from __future__ import annotations

import json
import math
from pathlib import Path


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
