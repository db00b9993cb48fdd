"""The RL run report: ``report.md`` and ``report.png``, written at the end of a run (or when a guard stops it).

An RL run that was stopped by a guard, or that finished with a rising reward, raises the same question: did the
policy learn the task or game the reward? The report puts the evidence on one page. The plot shows the training
rewards next to the held-out guard rewards, the KL to the reference, the mean length, the entropy and the share of
duplicate completions, with every guard event drawn where it fired and the kept checkpoint marked. The Markdown
says in one paragraph how the run ended and which policy was kept, then lists the events and the first, last,
minimum and maximum of the main metrics.

It reads only the per-step history (``{"step": int, **metrics}``) and the :class:`GuardEvent` list, so it can be
rebuilt from ``metrics.jsonl`` after the fact. A missing or NaN metric is a step where it was not measured: it is
left out of the curves and of the statistics, never drawn as zero.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.rl.guards import GuardEvent, measured_value

# The metrics every report tabulates (when logged), in this order; reward/<name> and guard/<name> follow theirs.
_ORDER = [
    "reward", "reward/", "heldout/reward", "guard/", "guard/gap", "kl", "kl/trend",
    "length/mean", "length/change", "length/trend", "entropy", "duplicates/share",
]


def write_report(
    output_dir: str | Path,
    history: list[dict],
    events: list[GuardEvent],
    *,
    title: str,
    summary: dict[str, str] | None = None,
    stopped_step: int | None = None,
    kept_step: int | None = None,
) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.png`` into ``output_dir`` and return their paths (Markdown first).

    ``stopped_step`` defaults to the step of the first ``stop`` event; ``kept_step`` is the step of the policy the
    trainer kept (for a stopped run, usually ``GuardMonitor.last_passing_step``). Works with an empty history.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for index, row in enumerate(history):
        if not isinstance(row.get("step"), int):
            raise ValueError(f"history[{index}]: expected a 'step' integer key, got {row.get('step')!r}")
    if stopped_step is None:
        stopped_step = next((event.step for event in events if event.action == "stop"), None)
    png = output_dir / "report.png"
    _plot(png, history, events, title, kept_step)
    md = output_dir / "report.md"
    md.write_text(_markdown(history, events, title, summary or {}, stopped_step, kept_step), encoding="utf-8")
    return md, png


def _markdown(
    history: list[dict],
    events: list[GuardEvent],
    title: str,
    summary: dict[str, str],
    stopped_step: int | None,
    kept_step: int | None,
) -> str:
    lines = [f"# {title}", "", _outcome(history, events, stopped_step, kept_step), "", "## Guard events", ""]
    if events:
        lines += ["| step | metric | value | threshold | action |", "|---:|---|---:|---|---|"]
        lines += [
            f"| {e.step} | {_cell(e.metric)} | {_fmt(e.value)} | {e.threshold} | {e.action} |" for e in events
        ]
    else:
        lines.append("No guard fired.")
    lines += ["", "## Metrics", ""]
    names = _main_metrics(history)
    if names:
        lines += ["| metric | first | last | min | max | measured steps |", "|---|---:|---:|---:|---:|---:|"]
        for name in names:
            _, values = _series(history, name, finite=False)
            if values:
                stats = [_fmt(values[0]), _fmt(values[-1]), _fmt(min(values)), _fmt(max(values))]
            else:
                stats = ["—"] * 4
            lines.append(f"| {_cell(name)} | {' | '.join(stats)} | {len(values)} |")
    else:
        lines.append("No metrics were logged.")
    if summary:
        lines += ["", "## Run", ""]
        lines += [f"- **{key}**: {value}" for key, value in summary.items()]
    lines += ["", "## Curves", "", "![reward, guard rewards, KL, length, entropy and duplicates per step](report.png)", ""]
    return "\n".join(lines)


def _outcome(history: list[dict], events: list[GuardEvent], stopped_step: int | None, kept_step: int | None) -> str:
    kept = ""
    if stopped_step is not None:
        warnings = sum(1 for e in events if e.action == "warn" and e.step <= stopped_step)
        stop = next((e for e in events if e.action == "stop" and e.step == stopped_step), None)
        if stop is not None:
            steps = "step" if stop.rule.patience == 1 else "steps"
            crossed = "<" if stop.threshold.startswith("min") else ">"
            text = (
                f"Stopped at step {stopped_step} by guard {stop.metric} ({_fmt(stop.value)} {crossed} "
                f"{stop.threshold} for {stop.rule.patience} measured {steps})"
            )
            text += f": {stop.rule.message}" if stop.rule.message else ""
        else:
            text = f"Stopped at step {stopped_step} (no guard stop event at that step)"
        if kept_step is not None:
            kept = f"; the policy from step {kept_step} (the last that passed every guard) was kept"
        else:
            kept = "; no checkpoint from before the stop was kept"
        return f"{text}{kept}. {_count(warnings, 'warning')} before the stop."
    if not history:
        return "No steps were logged; no guard stopped the run."
    warnings = sum(1 for e in events if e.action == "warn")
    if kept_step is not None:
        kept = f" The policy from step {kept_step} was kept."
    return f"Completed {history[-1]['step']} steps; no guard stopped the run; {_count(warnings, 'warning')}.{kept}"


def _plot(path: Path, history: list[dict], events: list[GuardEvent], title: str, kept_step: int | None) -> None:
    # The object API with the Agg canvas: no pyplot, so no display and no global figure state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    names = {key for row in history for key in row}
    # Training reward (sampled) and each source, plus the held-out reward on eval prompts where measured.
    rewards = ["reward"] + sorted(n for n in names if n.startswith("reward/") and n != "reward/group_std")
    rewards += ["heldout/reward"] if "heldout/reward" in names else []
    guards = sorted(n for n in names if n.startswith("guard/") and n != "guard/gap")
    guards += ["guard/gap"] if "guard/gap" in names else []
    panels = [("reward", rewards, [])]  # (y label, metrics on the left axis, metrics on a right axis)
    if guards:
        panels.append(("held-out guards", guards, []))
    panels += [
        ("KL", ["kl"], []),
        ("mean length (tokens)", ["length/mean"], []),
        ("entropy", ["entropy"], ["duplicates/share"]),
    ]

    fig = Figure(figsize=(8, 1.9 * len(panels) + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    warn_steps = sorted({e.step for e in events if e.action == "warn"})
    stop_steps = sorted({e.step for e in events if e.action == "stop"})
    legends = []
    for ax, (label, left, right) in zip(axes, panels):
        handles = _draw(ax, history, left)
        if right:
            twin = ax.twinx()
            handles += _draw(twin, history, right, color="tab:purple")
            twin.set_ylabel(", ".join(right), color="tab:purple", fontsize=8)
        if not handles:
            ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="gray")
        for step in warn_steps:
            ax.axvline(step, color="orange", ls="--", lw=1)
        for step in stop_steps:
            ax.axvline(step, color="red", lw=1.5)
        if kept_step is not None:
            ax.axvline(kept_step, color="green", ls=":", lw=1.2)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        legends.append(handles)

    # The first panel's legend also explains the event lines; the kept policy is starred on the reward curve.
    extra = []
    if warn_steps:
        extra.append(Line2D([], [], color="orange", ls="--", label="guard warn"))
    if stop_steps:
        extra.append(Line2D([], [], color="red", label="guard stop"))
    if kept_step is not None:
        kept_reward = next((measured_value(r.get("reward")) for r in history if r["step"] == kept_step), None)
        if kept_reward is not None and abs(kept_reward) != float("inf"):
            axes[0].plot([kept_step], [kept_reward], marker="*", color="green", ms=12, ls="none")
        extra.append(Line2D([], [], color="green", ls=":", marker="*", label=f"kept policy (step {kept_step})"))
    legends[0] += extra
    for ax, handles in zip(axes, legends):
        if handles:
            ax.legend(handles=handles, fontsize=7, loc="best")
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)


def _draw(ax, history: list[dict], names: list[str], color: str | None = None) -> list:
    """Plot each metric's finite measured points; markers when there are few, so one point still shows."""
    handles = []
    for name in names:
        steps, values = _series(history, name, finite=True)
        if steps:
            marker = "o" if len(steps) < 30 else None
            (line,) = ax.plot(steps, values, label=name, lw=1.2, marker=marker, ms=3, color=color)
            handles.append(line)
    return handles


def _series(history: list[dict], name: str, finite: bool) -> tuple[list[int], list[float]]:
    """The steps that measured ``name`` and its values there (only finite values when ``finite``)."""
    points = [(row["step"], measured_value(row.get(name))) for row in history]
    points = [(s, v) for s, v in points if v is not None and (not finite or abs(v) != float("inf"))]
    return [s for s, _ in points], [v for _, v in points]


def _main_metrics(history: list[dict]) -> list[str]:
    present = {key for row in history for key in row if key != "step"}
    ordered = []
    for entry in _ORDER:
        if entry.endswith("/"):  # a family: every reward/<name> or guard/<name> (guard/gap comes last)
            ordered += sorted(k for k in present if k.startswith(entry) and k not in _ORDER)
        elif entry in present:
            ordered.append(entry)
    return ordered


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _fmt(value: float) -> str:
    return f"{value:.4g}"
