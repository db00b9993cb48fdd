"""Reward-hacking guards: threshold rules on logged RL metrics that warn or stop a run.

An RL policy maximises the reward it is given, not the behaviour the reward was meant to measure. When it finds
a shortcut (answers that shrink to nothing because a brevity reward pays for it, a judge fooled by one stock
phrase, a KL that runs away from the reference), the training reward keeps rising while the model gets worse.
The guards watch the metrics the trainer logs once per optimizer step and raise a ``warn`` or ``stop`` event
when a rule's condition holds for ``patience`` consecutive measured steps, so the run can stop and keep the
last policy that passed every guard.

How the monitor reads the metrics:

1. A metric that is missing on a step, or NaN, was *not measured* there. It neither counts toward a rule's
   patience nor resets it. Held-out guard metrics (``guard/...``) are typically measured every few steps only.
   Infinite values are measurements (an infinite KL is a real and bad one).
2. A rule fires once when its streak reaches ``patience``; it fires again only after a measured step at which
   its condition did not hold ended the streak. Steps ``<= after`` are ignored by that rule (warm-up).
3. The monitor adds derived metrics to each step before checking the rules, computed on steps where their
   source is measured, from the measured points only (x is the step number, so gaps in measurement are fine).
   Computed values replace any the caller passed under the same name.

   - ``length/trend``: least-squares slope of ``length/mean`` over its last ``window`` measured points, in
     tokens per step (needs at least 3 points).
   - ``length/change``: relative change of ``length/mean`` against the mean of its first ``window`` measured
     points (``-0.6`` = 60% shorter than at the start). Emitted once that baseline is complete, so the
     reference it compares with never moves during the run (``after`` is not needed for it).
   - ``kl/trend``: least-squares slope of ``kl``, like ``length/trend``.

:meth:`GuardMonitor.state_dict` holds the patience counters, the trend windows, the baseline and the history
as plain JSON values, so a resumed run raises exactly the events an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal

from posttrain.errors import ConfigError

ACTIONS = ("warn", "stop")
_TRENDS = {"length/trend": "length/mean", "kl/trend": "kl"}  # derived metric -> the logged metric it follows
_CHANGE_SOURCE = "length/mean"


@dataclass(frozen=True)
class GuardRule:
    """Fire ``action`` when ``metric`` stays below ``min`` or above ``max`` for ``patience`` measured steps."""

    metric: str
    """Logged or derived metric name, e.g. ``length/change``, ``reward/judge`` or ``guard/gap``."""
    min: float | None = None
    """The condition holds when the value is below this bound (equal passes)."""
    max: float | None = None
    """The condition holds when the value is above this bound (equal passes)."""
    action: Literal["warn", "stop"] = "warn"
    """``warn`` only records the event; ``stop`` asks the trainer to end the run."""
    patience: int = 1
    """Consecutive measured steps the condition must hold before the rule fires."""
    after: int = 0
    """Steps ``<= after`` are ignored (warm-up, while the metrics are still settling)."""
    message: str | None = None
    """Optional text appended to the event message, e.g. what the violation usually means."""

    def __post_init__(self) -> None:
        problem = _value_problem(self.min, self.max, self.action, self.patience, self.after)
        if problem is not None:
            field, reason = problem
            raise ConfigError(f"guard rule on {self.metric!r}: {field}: {reason}")

    def violated_by(self, value: float) -> bool:
        return (self.min is not None and value < self.min) or (self.max is not None and value > self.max)


@dataclass(frozen=True)
class GuardEvent:
    """One firing of a rule: the step, the value that completed the streak, and a readable message."""

    step: int
    metric: str
    value: float
    rule: GuardRule
    action: Literal["warn", "stop"]
    message: str

    @property
    def threshold(self) -> str:
        """The bound that was crossed, e.g. ``min -0.5``."""
        if self.rule.min is not None and self.value < self.rule.min:
            return f"min {_fmt(self.rule.min)}"
        return f"max {_fmt(self.rule.max)}"

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "metric": self.metric,
            "value": _to_json(self.value),
            "rule": _rule_to_json(self.rule),
            "action": self.action,
            "message": self.message,
        }

    @classmethod
    def from_dict(cls, data: dict) -> GuardEvent:
        return cls(
            step=data["step"],
            metric=data["metric"],
            value=_from_json(data["value"]),
            rule=_rule_from_json(data["rule"]),
            action=data["action"],
            message=data["message"],
        )


def parse_rules(items: list[dict], key: str = "guards.rules") -> list[GuardRule]:
    """Validate rules from a user config (a list of dicts) into :class:`GuardRule` objects.

    Raises :class:`ConfigError` naming the item (``guards.rules[2].patience``) and what was expected.
    """
    if not isinstance(items, list):
        raise ConfigError(f"{key}: expected a list of rules, got {items!r}")
    names = [f.name for f in dataclasses.fields(GuardRule)]
    rules = []
    for index, item in enumerate(items):
        where = f"{key}[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a rule like {{metric: length/change, min: -0.5, action: stop}}, got {item!r}")
        for field in item:
            if field not in names:
                close = difflib.get_close_matches(str(field), names, n=2, cutoff=0.6)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(f"{where}.{field}: unknown field{hint}; a rule has {', '.join(names)}")
        metric = item.get("metric")
        if not isinstance(metric, str) or not metric:
            got = "missing" if "metric" not in item else f"got {metric!r}"
            raise ConfigError(f"{where}.metric: expected the name of a logged metric, e.g. length/change; {got}")
        values = {
            "min": _bound(item.get("min"), f"{where}.min"),
            "max": _bound(item.get("max"), f"{where}.max"),
            "action": item.get("action", "warn"),
            "patience": _integer(item.get("patience", 1), f"{where}.patience"),
            "after": _integer(item.get("after", 0), f"{where}.after"),
        }
        problem = _value_problem(**values)
        if problem is not None:
            field, reason = problem
            raise ConfigError(f"{where}.{field}: {reason}")
        message = item.get("message")
        if message is not None and not isinstance(message, str):
            raise ConfigError(f"{where}.message: expected text, got {message!r}")
        rules.append(GuardRule(metric=metric, message=message, **values))
    return rules


class GuardMonitor:
    """Checks the rules on each step's metrics, after adding the derived metrics; keeps the full history."""

    def __init__(self, rules: list[GuardRule], window: int = 10):
        if window < 3:
            raise ConfigError(f"guard window: expected an integer >= 3 (a trend needs 3 points), got {window}")
        self.rules = list(rules)
        self.window = window
        self.history: list[dict] = []  # {"step": int, **augmented metrics}, one per observed step
        self.events: list[GuardEvent] = []
        self._streaks = [0] * len(self.rules)  # consecutive measured steps on which each rule's condition held
        self._recent: dict[str, list[tuple[int, float]]] = {source: [] for source in _TRENDS.values()}
        self._baseline: list[float] = []  # the first `window` measured values of length/mean
        self._last_passing_step: int | None = None

    @property
    def stopped(self) -> GuardEvent | None:
        """The first ``stop`` event, or None while no stop rule has fired."""
        return next((event for event in self.events if event.action == "stop"), None)

    @property
    def last_metrics(self) -> dict:
        """The last observed step's metrics, with the derived metrics added (empty before the first step)."""
        if not self.history:
            return {}
        return {k: v for k, v in self.history[-1].items() if k != "step"}

    @property
    def last_passing_step(self) -> int | None:
        """The latest step at which no stop rule was in a streak of violations.

        The checkpoint to keep when a stop rule fires: with patience 3 the streak began two steps before the
        stop. A step that did not measure a rule's metric keeps the streak it inherited, so a step between two
        violations never counts as passing.
        """
        return self._last_passing_step

    @property
    def never_measured(self) -> list[str]:
        """Metrics named by a rule that no observed step has measured: often a typo in the rule."""
        seen = {k for row in self.history for k, v in row.items() if measured_value(v) is not None}
        return sorted({rule.metric for rule in self.rules} - seen)

    def observe(self, step: int, metrics: dict[str, Any]) -> list[GuardEvent]:
        """Add the derived metrics to ``metrics`` (in place), check every rule, and return the new events."""
        last = self.history[-1]["step"] if self.history else None
        if last is not None and step <= last:
            raise ValueError(f"step {step} observed after step {last}; steps must increase (resume from the state_dict)")
        metrics.update(self._derive(step, metrics))

        new_events = []
        for index, rule in enumerate(self.rules):
            value = measured_value(metrics.get(rule.metric))
            if step <= rule.after or value is None:
                continue  # warm-up, or not measured: the streak neither grows nor resets
            if not rule.violated_by(value):
                self._streaks[index] = 0
                continue
            self._streaks[index] += 1
            if self._streaks[index] == rule.patience:
                new_events.append(_event(step, value, rule))
        if all(streak == 0 for rule, streak in zip(self.rules, self._streaks) if rule.action == "stop"):
            self._last_passing_step = step
        self.events.extend(new_events)
        self.history.append({**{k: _plain(v) for k, v in metrics.items()}, "step": step})
        return new_events

    def _derive(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        derived = {}
        for name, source in _TRENDS.items():
            value = measured_value(metrics.get(source))
            if value is None:
                continue  # a trend is reported on the steps that measure its source only
            recent = self._recent[source]
            recent.append((step, value))
            del recent[: -self.window]
            if len(recent) >= 3:
                derived[name] = _slope(recent)
        length = measured_value(metrics.get(_CHANGE_SOURCE))
        if length is not None:
            if len(self._baseline) < self.window:
                self._baseline.append(length)
            start = sum(self._baseline) / len(self._baseline)
            if len(self._baseline) == self.window and start > 0 and math.isfinite(start):
                derived["length/change"] = length / start - 1.0
        return derived

    def state_dict(self) -> dict:
        """Everything a resumed run needs, as plain JSON values (non-finite floats as strings)."""
        return {
            "window": self.window,
            "rules": [_rule_to_json(rule) for rule in self.rules],
            "streaks": list(self._streaks),
            "recent": {source: [[s, _to_json(v)] for s, v in points] for source, points in self._recent.items()},
            "baseline": [_to_json(v) for v in self._baseline],
            "last_passing_step": self._last_passing_step,
            "history": [{k: _to_json(v) for k, v in row.items()} for row in self.history],
            "events": [event.to_dict() for event in self.events],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`. A rule that was not in the saved state starts with no streak."""
        if state["window"] != self.window:
            raise ConfigError(
                f"guard window changed from {state['window']} to {self.window} on resume; "
                "keep it as it was, or start a new run"
            )
        saved = {_rule_from_json(rule): streak for rule, streak in zip(state["rules"], state["streaks"])}
        self._streaks = [saved.get(rule, 0) for rule in self.rules]
        self._recent = {
            source: [(s, _from_json(v)) for s, v in state["recent"].get(source, [])] for source in _TRENDS.values()
        }
        self._baseline = [_from_json(v) for v in state["baseline"]]
        self._last_passing_step = state["last_passing_step"]
        self.history = [{k: _from_json(v) for k, v in row.items()} for row in state["history"]]
        self.events = [GuardEvent.from_dict(event) for event in state["events"]]


def _event(step: int, value: float, rule: GuardRule) -> GuardEvent:
    below = rule.min is not None and value < rule.min
    bound = f"< min {_fmt(rule.min)}" if below else f"> max {_fmt(rule.max)}"
    steps = "step" if rule.patience == 1 else "steps"
    message = f"step {step}: {rule.metric} = {_fmt(value)} {bound} for {rule.patience} {steps} ({rule.action})"
    if rule.message:
        message += f": {rule.message}"
    return GuardEvent(step=step, metric=rule.metric, value=value, rule=rule, action=rule.action, message=message)


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of value against step."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in points)
    variance = sum((x - mean_x) ** 2 for x, _ in points)
    return covariance / variance  # steps are distinct, so variance > 0


def _value_problem(
    min: float | None, max: float | None, action: Any, patience: int, after: int
) -> tuple[str, str] | None:
    """The first invalid field of a rule and why, or None. Shared by :func:`parse_rules` and ``GuardRule``."""
    if min is None and max is None:
        return "min", "a rule needs a min or a max (or both); neither was given"
    if min is not None and max is not None and min > max:
        return "min", f"min {min} is above max {max}, so every value would break the rule"
    if action not in ACTIONS:
        return "action", f"expected one of {', '.join(ACTIONS)}, got {action!r}"
    if patience < 1:
        return "patience", f"expected an integer >= 1 (consecutive measured steps), got {patience}"
    if after < 0:
        return "after", f"expected an integer >= 0 (the last warm-up step), got {after}"
    return None


def _bound(value: Any, where: str) -> float | None:
    if value is None:
        return None
    number = None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or math.isnan(number):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    return number


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return value


def measured_value(value: Any) -> float | None:
    """The value as a float, or None when it was not measured (missing, NaN, or not a number).

    Strings are parsed, so rows read back from ``metrics.jsonl`` (which stores NaN as ``"nan"``) work too.
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return None if math.isnan(number) else number


def _plain(value: Any) -> Any:
    """numpy scalars and other Real numbers -> float, so the history stays JSON-able."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int)):
        return float(value)
    return value


def _to_json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf": strict JSON has no such numbers
    return value


def _from_json(value: Any) -> Any:
    return float(value) if value in ("nan", "inf", "-inf") else value


def _rule_to_json(rule: GuardRule) -> dict:
    return {k: _to_json(v) for k, v in dataclasses.asdict(rule).items()}


def _rule_from_json(data: dict) -> GuardRule:
    return GuardRule(**{k: _from_json(v) if k in ("min", "max") else v for k, v in data.items()})


def _fmt(value: float | None) -> str:
    return f"{value:.4g}"
