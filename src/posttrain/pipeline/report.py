"""The pipeline's report: ``report.md``, a self-contained ``report.html`` (the figure embedded) and
``report.png``: every metric from the base model through each stage, each stage's gates, its training curves,
sample answers, and its time and peak memory."""

from __future__ import annotations

import base64
import html
import json
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from posttrain.pipeline.run import PipelineResult

CURVES = ("train/loss", "train/reward", "reward")  # what a stage's training curve shows, when logged


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import os

    from posttrain.runtime import cpu_flags

    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or "CPU")
    bf16 = "AVX512-BF16" if "avx512_bf16" in cpu_flags() else ("AVX2" if "avx2" in cpu_flags() else "no AVX2")
    return f"{name} ({bf16}, {os.cpu_count()} cores)"


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _secs(s) -> str:
    return "-" if s is None else f"{s:.0f}"


def _mb(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MB"


def metric_table(result: PipelineResult) -> tuple[list[str], list[list[str]]]:
    from posttrain.evals.suite import higher_is_better

    cols = ["base"] + [r.name for r in result.records if r.eval]
    evals = [result.base_eval] + [r.eval for r in result.records if r.eval]
    names = [m for m in result.plan.recipe.evals.metric_names()]
    rows = []
    for m in names:
        arrow = "higher is better" if higher_is_better(m) else "lower is better"
        rows.append([f"{m} ({arrow})"] + [_fmt((e or {}).get("metrics", {}).get(m)) for e in evals])
    return ["metric"] + cols, rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _history(stage_dir: Path) -> list[dict]:
    path = stage_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def figure(result: PipelineResult, path: Path) -> Path | None:
    """One panel per metric (base -> stages) and one per stage's training curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header, _ = metric_table(result)
    evals = [result.base_eval] + [r.eval for r in result.records if r.eval]
    metrics = [m for m in result.plan.recipe.evals.metric_names()]
    curves = [(r, _history(result.plan.stage(r.name).output_dir)) for r in result.records if r.status in ("trained", "skipped")]
    curves = [(r, h) for r, h in curves if any(k in row for row in h for k in CURVES)]
    panels = len(metrics) + len(curves)
    if panels == 0:
        return None
    cols = min(4, panels)
    rows = (panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, m in zip(flat, metrics):
        values = [(e or {}).get("metrics", {}).get(m) for e in evals]
        xs = [i for i, v in enumerate(values) if v is not None]
        ax.plot(xs, [values[i] for i in xs], "o-", color="tab:blue")
        ax.set_xticks(range(len(header) - 1), header[1:], rotation=20, fontsize=8)
        ax.set_title(m, fontsize=9)
        ax.grid(alpha=0.3)
    for ax, (record, hist) in zip(flat[len(metrics):], curves):
        key = next(k for k in CURVES if any(k in row for row in hist))
        pts = [(row["step"], row[key]) for row in hist if isinstance(row.get(key), (int, float))]
        ax.plot(*zip(*pts), lw=1.2, color="tab:orange")
        ax.set_title(f"{record.name}: {key}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in flat[panels:]:
        ax.axis("off")
    fig.suptitle(result.plan.title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _outcome(result: PipelineResult) -> str:
    if result.stopped_at:
        return f"**Stopped after stage `{result.stopped_at}`: a gate failed.** Revisit that stage; every finished stage's output is kept."
    failed = [r.name for r in result.records if r.gate and not r.gate["ok"]]
    if failed:
        return f"Completed with failed gates (gates.on_fail: warn) at {', '.join(failed)}."
    return "Completed: every stage passed its gates."


def markdown(result: PipelineResult, png: Path | None) -> str:
    plan = result.plan
    lines = [f"# {plan.title}", "",
             f"Recipe `{plan.path}`, model `{plan.recipe.model}`, method `{plan.recipe.method}`; "
             f"{time.strftime('%Y-%m-%d %H:%M')} on {_device()}.", "", _outcome(result), "", "## Metrics", ""]
    header, rows = metric_table(result)
    lines += [_md_table(header, rows), ""]
    if png is not None:
        lines += [f"![metrics and training curves]({png.name})", ""]
    lines += ["## Stages", ""]
    stage_rows = []
    for r in result.records:
        s = plan.stage(r.name)
        ev = r.eval["seconds"] if r.eval else None
        stage_rows.append([r.name, r.kind, s.values["method"], r.status, _secs(r.seconds),
                           _mb(r.peak_rss_bytes), _secs(ev), "-" if r.gate is None else ("pass" if r.gate["ok"] else "FAIL")])
    lines += [_md_table(["stage", "kind", "method", "status", "train s", "peak memory", "eval s", "gates"], stage_rows), ""]
    base_s = result.base_eval["seconds"] if result.base_eval else None
    lines += [f"Base model evaluation: {_secs(base_s)} s. Train time and peak memory (max RSS of the stage's process) "
              "are from the run that trained the stage; `skipped` stages were unchanged and reused.", ""]
    for r in result.records:
        if not (r.gate or r.guard_stop):
            continue
        lines += [f"### Gates after `{r.name}`", ""]
        lines += [f"- {line}" for line in (r.gate or {}).get("reasons", [])]
        if r.guard_stop:
            lines += [f"- guard stop: {r.guard_stop.get('reason')} (policy kept from step {r.guard_stop.get('kept_step')})"]
        lines.append("")
    lines += ["## Sample answers", ""]
    evals = [("base", result.base_eval)] + [(r.name, r.eval) for r in result.records if r.eval]
    sets = sorted({k for _, e in evals if e for k in e.get("samples", {})})
    for key in sets:
        lines += [f"### {key}", ""]
        for name, e in evals:
            for sample in (e or {}).get("samples", {}).get(key, []):
                tag = sample.get("verdict", sample.get("score"))
                lines.append(f"- **{name}** ({_fmt(tag)}): {sample['prompt'][:120]!r} -> {sample['answer'][:200]!r}")
        lines.append("")
    return "\n".join(lines)


def write_report(result: PipelineResult) -> Path:
    out = result.plan.output_dir
    png = figure(result, out / "report.png")
    md = markdown(result, png)
    path = out / "report.md"
    path.write_text(md, encoding="utf-8")
    (out / "report.html").write_text(to_html(md, result.plan.title, png), encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary(result), indent=2), encoding="utf-8")
    return path


def summary(result: PipelineResult) -> dict:
    return {"title": result.plan.title, "stopped_at": result.stopped_at,
            "base": (result.base_eval or {}).get("metrics"),
            "stages": [{"name": r.name, "kind": r.kind, "status": r.status, "seconds": r.seconds,
                        "peak_rss_bytes": r.peak_rss_bytes, "metrics": (r.eval or {}).get("metrics"),
                        "gate": r.gate, "guard_stop": r.guard_stop} for r in result.records]}


def to_html(md: str, title: str, png: Path | None) -> str:
    """A self-contained page: the Markdown's tables, lists and headings as HTML, the figure inlined."""
    body, table = [], []

    def flush_table() -> None:
        if table:
            head, *rest = [[c.strip() for c in row.strip("|").split("|")] for row in table if not row.startswith("|---")]
            body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rest) + "</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("!["):
            if png is not None and png.exists():
                data = base64.b64encode(png.read_bytes()).decode()
                body.append(f'<img alt="metrics" src="data:image/png;base64,{data}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<li>{_inline(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    flush_table()
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
             "img{max-width:100%}li{margin:2px 0;list-style:none}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _inline(text: str) -> str:
    import re

    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)
