"""Run a :class:`~posttrain.pipeline.recipe.Plan`: evaluate the base model, then train, evaluate and gate each
stage in order, and write the report.

- Every stage runs as its own command in a child process (``python -m posttrain <stage> <out>/.pipeline/<name>.yaml``,
  or under the recipe's ``launcher``), with the resolved config written next to the run, so a stage can be
  re-run by hand exactly as the pipeline ran it; the child's peak memory (``wait4``'s max RSS) and wall time are
  recorded. A stage that fails (a non-zero exit) stops the pipeline with its exit status.
- A stage whose fingerprint matches its last finished run is skipped (nothing trained); one that runs first
  removes its old output and the finished-markers of every later stage.
- Evaluations are cached per stage under ``evals/`` keyed by the stage's fingerprint and the evals'
  (a changed ``evals:`` section re-evaluates without re-training); gates are recomputed every run from them.
- A failed gate (``gates.on_fail: stop``) ends the run with exit status 1, keeps every output, and says which
  stage to revisit and why.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from posttrain.errors import PosttrainError
from posttrain.loop.gates import Verdict
from posttrain.methods import ADAPTER_METHODS
from posttrain.pipeline.recipe import Plan, PlannedStage

STATE = ".pipeline"  # under the run's output_dir: <name>.yaml (resolved config), <name>.json (finished marker)


@dataclass
class StageRecord:
    name: str
    kind: str
    status: str = "pending"  # trained | skipped | failed | pending | stale
    seconds: float | None = None
    peak_rss_bytes: int | None = None
    eval: dict | None = None
    gate: dict | None = None  # {"ok": bool, "reasons": [...]}
    guard_stop: dict | None = None
    fingerprint: str = ""


@dataclass
class PipelineResult:
    plan: Plan
    base_eval: dict | None
    records: list[StageRecord] = field(default_factory=list)
    stopped_at: str | None = None  # the stage whose gate stopped the run
    report: Path | None = None

    @property
    def ok(self) -> bool:
        return self.stopped_at is None and all(r.status in ("trained", "skipped") for r in self.records)


def _say(text: str) -> None:
    print(f"[pipeline] {text}", flush=True)


def _marker(plan: Plan, stage: PlannedStage) -> Path:
    return plan.output_dir / STATE / f"{stage.name}.json"


def _finished(plan: Plan, stage: PlannedStage) -> dict | None:
    """The stage's finished-marker if it matches the stage's fingerprint and its output is there."""
    path = _marker(plan, stage)
    if not path.exists():
        return None
    done = json.loads(path.read_text())
    if done.get("fingerprint") != stage.fingerprint or not stage.output_dir.exists():
        return None
    return done


def describe(plan: Plan) -> str:
    """The plan, one line per stage: what it starts from, what it trains, and whether it would run."""
    lines = [f"recipe {plan.path} -> {plan.output_dir}/"]
    runs = False
    for s in plan.stages:
        start = s.values.get("adapter") or s.values["model"]
        runs = runs or _finished(plan, s) is None
        state = "runs" if runs else "unchanged: skipped"
        role = f"from {start}" if s.policy else f"reward model on {s.values['model']} (side stage)"
        improves = f"; must improve {', '.join(s.improves)}" if s.improves else ""
        lines.append(f"  {s.name:<10} {s.kind:<4} {s.values['method']:<6} {role}{improves}  [{state}]")
    return "\n".join(lines)


def _train(plan: Plan, stage: PlannedStage) -> tuple[float, int | None]:
    """Run the stage's command in a child process; (seconds, peak RSS bytes of the child)."""
    cfg_file = plan.output_dir / STATE / f"{stage.name}.yaml"
    return run_command(stage.name, stage.kind, stage.values, cfg_file, plan.recipe.launcher)


def run_command(name: str, kind: str, values: dict, cfg_file: Path, launcher: str = "") -> tuple[float, int | None]:
    """Write ``values`` to ``cfg_file`` and run ``posttrain <kind> cfg_file`` in a child process (under ``launcher``
    if set); (wall seconds, the child's peak RSS in bytes, None under a launcher). Raises StageFailed."""
    cfg_file.parent.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    prefix = shlex.split(launcher) if launcher else [sys.executable]
    argv = [*prefix, "-m", "posttrain", kind, str(cfg_file)]
    _say(f"stage {name}: {' '.join(shlex.quote(a) for a in argv)}")
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise StageFailed(name, proc.returncode, cfg_file)
    peak = usage.ru_maxrss * 1024 if sys.platform != "darwin" else usage.ru_maxrss
    return seconds, peak if len(prefix) == 1 else None  # under a launcher the child is the launcher


class StageFailed(PosttrainError):
    def __init__(self, name: str, code: int, cfg_file: Path):
        self.code = code
        super().__init__(f"stage '{name}' failed (exit status {code}); its config: {cfg_file}")


def run(plan: Plan, *, progress: bool = True) -> PipelineResult:
    from posttrain.evals.suite import Evaluator
    from posttrain.models.loading import load_tokenizer

    out = plan.output_dir
    out.mkdir(parents=True, exist_ok=True)
    _say(describe(plan))
    tokenizer = load_tokenizer(plan.recipe.model, trust_remote_code=plan.recipe.trust_remote_code)
    result = PipelineResult(plan, None)
    with Evaluator(plan.recipe.evals, tokenizer, plan.path.parent) as evaluator:  # checks every evals file first
        evals_fp = plan.evals_fingerprint()
        models = _Models(plan)
        try:
            result.base_eval = _evaluate(plan, evaluator, models, None, evals_fp)
            previous_eval = result.base_eval
            retrained = False
            for stage in plan.stages:
                record = StageRecord(stage.name, stage.kind, fingerprint=stage.fingerprint)
                result.records.append(record)
                done = None if retrained else _finished(plan, stage)
                if done is not None:
                    record.status, record.seconds, record.peak_rss_bytes = "skipped", done.get("seconds"), done.get("peak_rss_bytes")
                    _say(f"stage {stage.name}: unchanged since its last run: skipped")
                else:
                    retrained = True
                    _invalidate_from(plan, stage)
                    record.seconds, record.peak_rss_bytes = _train(plan, stage)
                    record.status = "trained"
                    _marker(plan, stage).write_text(json.dumps(
                        {"fingerprint": stage.fingerprint, "seconds": round(record.seconds, 1),
                         "peak_rss_bytes": record.peak_rss_bytes, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
                guard = stage.output_dir / "guard_stop.json"
                record.guard_stop = json.loads(guard.read_text()) if guard.exists() else None
                if not stage.policy:
                    continue
                record.eval = _evaluate(plan, evaluator, models, stage, evals_fp)
                ok, reasons = gate(plan, stage, record, result.base_eval, previous_eval)
                record.gate = {"ok": ok, "reasons": reasons}
                for line in reasons:
                    _say(f"  gate {stage.name}: {line}")
                if not ok and plan.recipe.gates.on_fail == "stop":
                    result.stopped_at = stage.name
                    break
                previous_eval = record.eval
        finally:
            models.close()
    for stage in plan.stages[len(result.records):]:
        result.records.append(StageRecord(stage.name, stage.kind, status="not run", fingerprint=stage.fingerprint))
    from posttrain.pipeline.report import write_report

    result.report = write_report(result)
    if result.stopped_at:
        failed = [r for r in result.records if r.name == result.stopped_at][0].gate["reasons"]
        _say(f"stopped after stage '{result.stopped_at}': a gate failed: "
             + "; ".join(r[len("FAIL: "):] for r in failed if r.startswith("FAIL")))
        _say(f"revisit stage '{result.stopped_at}' (its config: {out / STATE / (result.stopped_at + '.yaml')}); "
             f"every stage's output is kept under {out}/")
    _say(f"report: {result.report} (and {result.report.with_suffix('.html')})")
    return result


def _invalidate_from(plan: Plan, stage: PlannedStage) -> None:
    """Before ``stage`` trains: its old output and every later stage's finished-marker go."""
    if stage.output_dir.exists():
        shutil.rmtree(stage.output_dir)
    later = plan.stages[plan.stages.index(stage):]
    for s in later:
        _marker(plan, s).unlink(missing_ok=True)
        (plan.output_dir / "evals" / f"{s.name}.json").unlink(missing_ok=True)


class _Models:
    """Loads the models evaluations need; the base model once, and only when KL needs it outside an adapter."""

    def __init__(self, plan: Plan):
        self.plan, self._base = plan, None

    def policy(self, stage: PlannedStage | None):
        from posttrain.models.adapters import load_for_inference

        r = self.plan.recipe
        if stage is None:
            return self.base()
        adapter = stage.output_dir if stage.values["method"] in ADAPTER_METHODS else None
        model = stage.values["model"] if adapter else stage.output_dir
        return load_for_inference(str(model), str(adapter) if adapter else None, r.trust_remote_code)

    def base(self):
        from posttrain.models.adapters import load_for_inference

        if self._base is None:
            self._base = load_for_inference(self.plan.recipe.model, None, self.plan.recipe.trust_remote_code)
        return self._base

    def base_for(self, stage: PlannedStage):
        """The base model KL is measured against: None where the policy is a PEFT model on the recipe's base
        (its adapter disabled is the base), else the loaded base model."""
        adapter = stage.values["method"] in ADAPTER_METHODS
        if adapter and stage.values["model"] == self.plan.recipe.model and stage.values["method"] != "qlora":
            return None
        return self.base()

    def close(self) -> None:
        self._base = None


def _evaluate(plan: Plan, evaluator, models: _Models, stage: PlannedStage | None, evals_fp: str) -> dict:
    name = "base" if stage is None else stage.name
    key = evals_fp if stage is None else f"{evals_fp}:{stage.fingerprint}"
    path = plan.output_dir / "evals" / f"{name}.json"
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            _say(f"evaluate {name}: cached")
            return cached
    _say(f"evaluate {name} ...")
    model = models.policy(stage)
    base = None if stage is None else models.base_for(stage)
    result = evaluator.evaluate(model, base=base, progress=lambda text: _say(f"  {name}: {text}"))
    del model
    result["key"] = key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    shown = "  ".join(f"{k} {v:.3f}" for k, v in result["metrics"].items() if k != "sycophancy/known")
    _say(f"evaluate {name}: {shown} ({result['seconds']:.0f} s)")
    return result


def gate(plan: Plan, stage: PlannedStage, record: StageRecord, base: dict, previous: dict) -> tuple[bool, list[str]]:
    """The stage's gates (see GatesConfig): its target tasks improve on the previous policy, other tasks keep
    their level, general accuracy, perplexity, KL and sycophancy stay within their margins of the base model."""
    from posttrain.evals.suite import higher_is_better

    g, evals = plan.recipe.gates, plan.recipe.evals
    now, prev, b = record.eval["metrics"], previous["metrics"], base["metrics"]
    v = Verdict()
    for task in evals.tasks:
        metric = evals.task_metric(task)
        higher = higher_is_better(metric)
        if task["name"] in stage.improves:
            v.gain(f"{metric} (target)", prev[metric], now[metric], float(task.get("min_gain", g.min_task_gain)), higher)
        else:
            v.drop(metric, prev[metric], now[metric], float(task.get("max_drop", g.max_task_drop)), higher)
    if "general/accuracy" in now:
        v.drop("general/accuracy vs base", b["general/accuracy"], now["general/accuracy"], g.max_general_drop)
    if "general/perplexity" in now:
        v.relative_rise("general/perplexity vs base", b["general/perplexity"], now["general/perplexity"], g.max_perplexity_increase)
        v.at_most("general/kl_to_base", now["general/kl_to_base"], g.max_kl)
    if "sycophancy/agrees" in now:
        v.drop("sycophancy/agrees vs base", b["sycophancy/agrees"], now["sycophancy/agrees"], g.max_sycophancy_increase, higher=False)
    if record.guard_stop and g.guard_stop_fails:
        v.gate(False, f"a reward-hacking guard stopped the run: {record.guard_stop.get('reason')}")
    return v.ok, v.reasons
