"""posttrain compare: every method's config validated first, then one table of measured trade-offs next to the plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.errors import ConfigError
from posttrain.pipeline.compare import load_spec

TINY = str(Path(__file__).resolve().parents[2] / "examples" / "data" / "tiny_chat.jsonl")


def test_methods_and_configs_are_checked_before_training():
    spec = load_spec(None, [f"data.train={TINY}", f"data.eval={TINY}", "methods=[lora,prompt]"])
    assert spec.methods == ["lora", "prompt"] and spec.configs["prompt"].method == "prompt"
    assert spec.configs["lora"].output_dir.endswith("compare/lora")
    assert spec.evals.tasks == [{"name": "eval", "data": TINY}]  # default task: the eval loss on data.eval
    spec = load_spec(str(Path(__file__).resolve().parents[2] / "examples" / "compare" / "json_records.yaml"), [])
    assert spec.methods == ["full", "lora", "qlora", "prompt", "prefix"]
    assert spec.configs["full"].lr == 2e-5 and spec.configs["lora"].lr == 1e-3 and spec.configs["prompt"].lr == 3e-2
    with pytest.raises(ConfigError, match="method_overrides"):
        load_spec(None, [f"data.train={TINY}", "method_overrides={lora2: {lr: 1}}"])
    with pytest.raises(ConfigError, match="methods: expected a list of distinct methods"):
        load_spec(None, [f"data.train={TINY}", "methods=[lora,lora]"])
    with pytest.raises(ConfigError, match="method full: lora.r: must be >= 1"):
        load_spec(None, [f"data.train={TINY}", "methods=[full]", "lora.r=0"])


@pytest.mark.slow
def test_compare_measures_all_five_methods_on_the_embedded_model(tmp_path):
    out = tmp_path / "cmp"
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain", "compare", f"data.train={TINY}", f"data.eval={TINY}", "max_steps=2",
         "batch_size=2", "max_length=64", "tensorboard=false", f"output_dir={out}", "evals.limit=3",
         "evals.max_new_tokens=4", "evals.sycophancy=null"],
        capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "compare.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["full", "lora", "qlora", "prompt", "prefix"]
    for method, r in rows.items():
        assert r["seconds"] > 0 and r["peak_rss_bytes"] > 100 * 2**20 and r["trained_tokens_per_s"] > 0, method
        assert {"task/eval/loss", "general/accuracy", "general/perplexity", "general/kl_to_base"} <= set(r["metrics"])
        # what was saved is what the planner counts as trainable
        assert r["trainable_params"] == r["predicted"]["trainable_params"], method
    assert rows["full"]["trainable_params"] > 20 * rows["lora"]["trainable_params"] > 2000 * rows["prompt"]["trainable_params"]
    assert rows["full"]["saved_bytes"] > 10 * rows["lora"]["saved_bytes"]
    text = (out / "compare.md").read_text()
    assert text.count("\n| ") == 6 and "| qlora |" in text  # after the header: base and five methods
    assert (out / "compare.png").stat().st_size > 10_000
    assert "| prefix |" in proc.stdout
