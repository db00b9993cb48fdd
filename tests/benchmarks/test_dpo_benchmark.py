"""The preference benchmark (benchmarks/dpo_throughput.py): its data, its parity check, and short runs on the tiny
model (the TRL side only where TRL, the `bench` extra, is installed)."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("dpo_throughput")


def test_pairs_are_deterministic_wrong_answers_of_the_same_shape(bench):
    pairs = bench.make_pairs(40, seed=1)
    assert pairs == bench.make_pairs(40, seed=1) and pairs != bench.make_pairs(40, seed=2)
    for p in pairs:
        chosen, rejected = p["chosen"][0]["content"], p["rejected"][0]["content"]
        assert p["prompt"][-1]["role"] == "user" and chosen != rejected
        assert abs(len(chosen) - len(rejected)) <= len(chosen.split("\n")[0]) + 1  # same length, up to one line
    rows = bench.kto_rows(pairs[:3])
    assert [r["label"] for r in rows] == [True, False] * 3 and rows[1]["completion"] == pairs[0]["rejected"]


def test_parity_check_compares_within_the_tolerance(bench):
    ours = {"first_metrics": {"loss": 0.693147, "logps/chosen": -120.00005, "logps/rejected": -130.0}}
    theirs = {"first_metrics": {"loss": 0.6931472, "logps/chosen": -120.0, "logps/rejected": -130.5}}
    got = {c["metric"]: c["ok"] for c in bench.parity_check(ours, theirs)}
    assert got == {"loss": True, "logps/chosen": True, "logps/rejected": False}
    assert bench.parity_check({"first_metrics": {}}, theirs)[0]["ok"] is None  # not logged: unknown, not passed


def test_posttrain_side_runs_every_stage(bench, tiny_model_dir, tmp_path):
    report = bench.main(["--model", str(tiny_model_dir), "--tools", "posttrain", "--parts", "speed", "--steps", "1",
                         "--warmup", "1", "--pairs", "24", "--out", str(tmp_path)])
    runs = {r["stage"]: r for r in report["runs"]}
    assert set(runs) == {"dpo", "kto", "rm"} and not any("failed" in r for r in runs.values())
    for r in runs.values():
        assert r["timed_steps"] == 1 and r["examples_per_s"] > 0 and r["peak_rss_mb"] > 0
    assert runs["dpo"]["losses"][0] == pytest.approx(0.693147, abs=1e-5)  # the adapter starts at zero: ln 2
    assert (tmp_path / "results.md").read_text().count("| posttrain |") == 3
    assert json.loads((tmp_path / "results.json").read_text())["data"]["pairs"] == 24


def test_trl_parity_on_identical_inputs(bench, tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    report = bench.main(["--model", str(tiny_model_dir), "--parts", "parity", "--pairs", "24", "--trl-bf16", "off",
                         "--out", str(tmp_path)])
    checks = {c["metric"]: c for c in report["parity"]}
    assert all(c["ok"] for c in checks.values()), checks
