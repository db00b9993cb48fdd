"""benchmarks/serve_load.py runs end to end on a tiny model (numbers are not checked: timing is not a test)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests import ROOT_DIR

pytest.importorskip("uvicorn")


def test_serve_load_benchmark_runs_and_loses_no_write(tiny_model_dir, tmp_path):
    path = ROOT_DIR / "benchmarks" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = module
    spec.loader.exec_module(module)
    out = tmp_path / "r.json"
    assert module.main(["--model", str(tiny_model_dir), "--clients", "1,3", "--requests", "4", "--max-tokens", "4",
                        "--writers", "3", "--writes", "5", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["clients"] for r in report["serve"]] == [1, 3]
    assert all(r["requests"] == 4 and r["errors"] == 0 for r in report["serve"])
    sqlite = report["feedback"][0]
    assert sqlite["acknowledged"] == sqlite["stored"] == 15 and sqlite["lost"] == 0
