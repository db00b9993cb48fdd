"""Reward-hacking guards and the RL run report, on crafted histories whose right answer is known by construction."""

from __future__ import annotations

import json
import math

import pytest

from posttrain.errors import ConfigError
from posttrain.rl.guards import GuardMonitor, GuardRule, parse_rules
from posttrain.rl.report import write_report

NAN = float("nan")


def observe_all(monitor: GuardMonitor, rows: list[tuple[int, dict]]) -> list:
    return [event for step, metrics in rows for event in monitor.observe(step, dict(metrics))]


def length_collapse() -> list[tuple[int, dict]]:
    """Baseline (steps 1-5) averages 100 tokens; from step 12 the length stays over 50% below it."""
    lengths = [90, 110, 100, 95, 105, 100, 100, 100, 100, 100, 70, 45, 40, 29, 20, 20]
    return [(step, {"reward": 0.1 * step, "length/mean": float(n)}) for step, n in enumerate(lengths, start=1)]


COLLAPSE_RULE = GuardRule(metric="length/change", min=-0.5, action="stop", patience=3)


def test_length_collapse_stops_at_the_third_consecutive_step():
    monitor = GuardMonitor([COLLAPSE_RULE], window=5)
    events = observe_all(monitor, length_collapse())

    # length/change = length / 100 - 1: -0.3 at step 11, then -0.55, -0.6, -0.71 -> the third below -0.5 is step 14.
    assert [(e.step, e.action) for e in events] == [(14, "stop")]
    assert monitor.stopped is events[0]
    assert events[0].message == "step 14: length/change = -0.71 < min -0.5 for 3 steps (stop)"
    assert events[0].threshold == "min -0.5"
    assert monitor.last_passing_step == 11  # the streak began at step 12
    # The baseline is complete at the 5th measured step; before it there is no length/change.
    assert all("length/change" not in row for row in monitor.history[:4])
    assert monitor.history[4]["length/change"] == pytest.approx(0.05)


def test_warn_rule_fires_once_per_episode_and_never_stops():
    kl = [0.05] * 4 + [0.2] * 4 + [0.05] * 3 + [0.3, 0.3]
    monitor = GuardMonitor([GuardRule(metric="kl", max=0.1, action="warn")])
    events = observe_all(monitor, [(step, {"kl": v}) for step, v in enumerate(kl, start=1)])

    assert [(e.step, e.action) for e in events] == [(5, "warn"), (12, "warn")]
    assert monitor.stopped is None
    assert monitor.last_passing_step == 13  # warn rules never make a step fail
    assert events[0].message == "step 5: kl = 0.2 > max 0.1 for 1 step (warn)"


def test_nan_and_missing_steps_neither_count_nor_reset_patience():
    rule = GuardRule(metric="reward/judge", max=0.9, action="stop", patience=3, message="judge saturated")
    rows = [
        (1, {"reward/judge": 0.95}),
        (2, {"reward/judge": NAN}),  # not measured
        (3, {}),  # not measured
        (4, {"reward/judge": 0.97}),
        (5, {"reward/judge": 0.99}),  # third measured violation in a row
        (6, {"reward/judge": 0.5}),
        (7, {"reward/judge": 0.95}),
        (8, {"reward/judge": NAN}),
        (9, {"reward/judge": 0.95}),
        (10, {"reward/judge": 0.5}),  # resets: 7 and 9 were only two
    ]
    monitor = GuardMonitor([rule])
    events = observe_all(monitor, rows)

    assert [e.step for e in events] == [5]
    assert events[0].message == "step 5: reward/judge = 0.99 > max 0.9 for 3 steps (stop): judge saturated"
    assert monitor.last_passing_step == 10  # steps 1-5 and 7-9 were all in a streak


def test_after_ignores_warm_up_steps():
    rule = GuardRule(metric="entropy", min=0.5, action="warn", patience=2, after=5)
    monitor = GuardMonitor([rule])
    events = observe_all(monitor, [(step, {"entropy": 0.1}) for step in range(1, 11)])
    assert [e.step for e in events] == [7]  # steps 6 and 7 are the first two after the warm-up


def test_trend_is_the_least_squares_slope_over_the_window():
    monitor = GuardMonitor([], window=4)
    rows = [
        (1, {"length/mean": 10.0, "kl": 0.03}),
        (2, {"length/mean": 12.0, "kl": 0.04}),
        (3, {"length/mean": 13.0, "kl": 0.05}),
        (4, {"length/mean": NAN, "kl": 0.06}),
        (5, {"length/mean": 19.0, "kl": 0.07}),
        (6, {}),
        (7, {"length/mean": 20.0}),
    ]
    seen = {}
    for step, metrics in rows:
        monitor.observe(step, metrics)
        assert monitor.last_metrics == metrics  # observe adds the derived metrics to the caller's dict
        seen[step] = metrics

    assert "length/trend" not in seen[2]  # only two points
    # (1,10) (2,12) (3,13): sum(dx*dy) = 3, sum(dx^2) = 2.
    assert seen[3]["length/trend"] == pytest.approx(1.5)
    assert "length/trend" not in seen[4] and "length/trend" not in seen[6]  # not measured there
    # (1,10) (2,12) (3,13) (5,19): means 2.75 and 13.5; sum(dx*dy) = 19.5, sum(dx^2) = 8.75.
    assert seen[5]["length/trend"] == pytest.approx(19.5 / 8.75)
    # The window keeps the last 4 measured points, (2,12) (3,13) (5,19) (7,20): 26 / 14.75.
    assert seen[7]["length/trend"] == pytest.approx(26 / 14.75)
    assert seen[5]["kl/trend"] == pytest.approx(0.01)
    # The baseline is the mean of the first 4 measured lengths, 10, 12, 13 and 19 = 13.5.
    assert "length/change" not in seen[3]
    assert seen[5]["length/change"] == pytest.approx(19 / 13.5 - 1)
    assert seen[7]["length/change"] == pytest.approx(20 / 13.5 - 1)

    with pytest.raises(ValueError, match="steps must increase"):
        monitor.observe(7, {})


def mixed_run() -> list[tuple[int, dict]]:
    """40 steps with drifting length and KL, NaNs, guard metrics every other step, and a streak across step 20."""
    rows = []
    for step in range(1, 41):
        metrics = {
            "reward": 0.02 * step,
            "length/mean": 120.0 - 2.0 * step + (7.0 if step % 3 == 0 else 0.0),
            "kl": 0.004 * step if step % 7 else NAN,
            "x": 1.0 if step in (19, 20, 21) else 0.0,
        }
        if step % 2 == 0:
            metrics["guard/gap"] = 0.1 + 0.02 * step
        rows.append((step, metrics))
    return rows


MIXED_RULES = [
    GuardRule(metric="x", max=0.5, action="warn", patience=3),
    GuardRule(metric="length/trend", min=-1.5, action="warn", patience=2),
    GuardRule(metric="guard/gap", max=0.5, action="warn", patience=2),
    GuardRule(metric="length/change", min=-0.4, action="stop", patience=3),
    GuardRule(metric="kl/trend", max=0.01, action="stop", patience=2),
]


def test_state_dict_round_trip_gives_the_events_of_an_uninterrupted_run():
    rows = mixed_run()
    uninterrupted = GuardMonitor(MIXED_RULES, window=6)
    observe_all(uninterrupted, rows)

    first = GuardMonitor(MIXED_RULES, window=6)
    observe_all(first, rows[:20])
    state = json.loads(json.dumps(first.state_dict(), allow_nan=False))  # strict JSON: NaN travels as text
    resumed = GuardMonitor(MIXED_RULES, window=6)
    resumed.load_state_dict(state)
    observe_all(resumed, rows[20:])

    later = [e.to_dict() for e in uninterrupted.events if e.step > 20]
    assert any(e["metric"] == "x" and e["step"] == 21 for e in later)  # its streak spans the interruption
    assert any(e["action"] == "stop" for e in later)
    assert [e.to_dict() for e in resumed.events] == [e.to_dict() for e in uninterrupted.events]
    assert resumed.last_passing_step == uninterrupted.last_passing_step
    assert json.dumps(resumed.history) == json.dumps(uninterrupted.history)  # derived metrics too; NaN == NaN

    with pytest.raises(ConfigError, match="window changed from 6 to 10"):
        GuardMonitor(MIXED_RULES, window=10).load_state_dict(state)


def test_parse_rules_accepts_config_dicts():
    rules = parse_rules(
        [
            {"metric": "length/change", "min": -0.5, "action": "stop", "patience": 3},
            {"metric": "kl", "max": "1e-1", "after": 10, "message": "policy drifting"},
        ]
    )
    assert rules[0] == COLLAPSE_RULE
    assert rules[1] == GuardRule(metric="kl", max=0.1, action="warn", after=10, message="policy drifting")


@pytest.mark.parametrize(
    "item, expected",
    [
        ({"metric": "kl", "maxx": 0.1}, ["guards.rules[1].maxx", "unknown field", "did you mean max"]),
        ({"metric": "kl"}, ["guards.rules[1].min", "neither"]),
        ({"metric": "kl", "min": 2, "max": 1}, ["guards.rules[1].min", "above max"]),
        ({"metric": "kl", "max": 1, "action": "halt"}, ["guards.rules[1].action", "warn, stop", "'halt'"]),
        ({"metric": "kl", "max": 1, "patience": 0}, ["guards.rules[1].patience", ">= 1", "got 0"]),
        ({"metric": "kl", "max": 1, "patience": "3"}, ["guards.rules[1].patience", "expected an integer"]),
        ({"metric": "kl", "max": "high"}, ["guards.rules[1].max", "expected a number"]),
        ({"max": 1}, ["guards.rules[1].metric", "missing"]),
        ("kl < 1", ["guards.rules[1]:", "expected a rule like"]),
    ],
)
def test_parse_rules_errors_name_the_item_and_field(item, expected):
    with pytest.raises(ConfigError) as caught:
        parse_rules([{"metric": "kl", "max": 1.0}, item])
    for text in expected:
        assert text in str(caught.value)


def test_write_report_for_a_stopped_run(tmp_path):
    monitor = GuardMonitor([COLLAPSE_RULE, GuardRule(metric="reward", max=1.0, action="warn")], window=5)
    observe_all(monitor, length_collapse())
    md, png = write_report(
        tmp_path / "report",
        monitor.history,
        monitor.events,
        title="GRPO on concise answers",
        summary={"model": "smollm2-135m", "rules": "2"},
        kept_step=monitor.last_passing_step,
    )

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert text.startswith("# GRPO on concise answers\n")
    assert "Stopped at step 14 by guard length/change" in text
    assert "the policy from step 11 (the last that passed every guard) was kept" in text
    assert "| 14 | length/change | -0.71 | min -0.5 | stop |" in text
    assert "| 11 | reward | 1.1 | max 1 | warn |" in text
    assert "1 warning before the stop" in text
    assert "| length/mean | 90 | 20 | 20 | 110 | 16 |" in text
    assert "- **model**: smollm2-135m" in text
    assert "![" in text and "(report.png)" in text


def test_write_report_for_a_completed_run(tmp_path):
    rows = [(step, {"reward": 0.1, "kl": 0.2 if step in (5, 12) else 0.05}) for step in range(1, 14)]
    monitor = GuardMonitor([GuardRule(metric="kl", max=0.1, action="warn")])
    observe_all(monitor, rows)
    md, _ = write_report(tmp_path, monitor.history, monitor.events, title="run", kept_step=13)
    text = md.read_text()
    assert "Completed 13 steps; no guard stopped the run; 2 warnings. The policy from step 13 was kept." in text


@pytest.mark.parametrize(
    "history",
    [
        [],
        [{"step": 1, "reward": NAN}],
        [{"step": 1, "reward": 0.5, "kl": NAN, "guard/gap": 0.1, "entropy": 1.2, "duplicates/share": 0.0}],
        [{"step": 1, "reward": NAN}, {"step": 2, "reward": 0.3, "length/mean": "nan"}, {"step": 3}],
    ],
)
def test_write_report_handles_short_histories_and_nans(tmp_path, history):
    md, png = write_report(tmp_path, history, [], title="tiny")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert "No guard fired." in text
    if history:
        assert f"Completed {history[-1]['step']} steps" in text
        assert "| reward |" in text
    if history and all(not math.isfinite(row.get("reward", NAN)) for row in history):
        assert "| reward | — | — | — | — | 0 |" in text
