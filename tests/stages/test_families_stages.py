"""The family matrix, stages: every training stage runs a step from the CLI with the defaults on every family,
and the inference commands (generate, eval, merge, serve) answer with what it trained."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.cli import main
from tests import ROOT_DIR
from tests.families import FAMILIES

ROOT = ROOT_DIR
DATA = ROOT / "examples" / "data"
NO_SEQUENCE_CLASSIFICATION = {"granite"}  # transformers has no GraniteForSequenceClassification
REWARD = "def words(prompt, completion, **row):\n    return float(len(completion.split()))\n"

STAGES = {  # name -> the command line after `posttrain`, beyond model= and output_dir=
    "sft-full": ["sft", "method=full", f"data.train={DATA / 'tiny_chat.jsonl'}"],
    "sft-lora": ["sft", f"data.train={DATA / 'tiny_chat.jsonl'}"],
    "sft-dora": ["sft", "lora.dora=true", f"data.train={DATA / 'tiny_chat.jsonl'}"],
    "sft-qlora": ["sft", "method=qlora", f"data.train={DATA / 'tiny_chat.jsonl'}"],
    "sft-prompt": ["sft", "method=prompt", f"data.train={DATA / 'tiny_chat.jsonl'}"],
    "sft-prefix": ["sft", "method=prefix", f"data.train={DATA / 'tiny_chat.jsonl'}"],
    "rm": ["rm", f"data.train={DATA / 'tiny_prefs.jsonl'}"],
    "dpo": ["dpo", f"data.train={DATA / 'tiny_prefs.jsonl'}"],
    "kto": ["kto", f"data.train={DATA / 'tiny_kto.jsonl'}"],
    "grpo": ["grpo", "{prompts}", "num_generations=2", "sampling.max_new_tokens=12", "{reward}"],
    "ppo": ["ppo", "{prompts}", "num_generations=2", "sampling.max_new_tokens=12", "{reward}"],
}


@pytest.fixture(scope="module")
def rl_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("family-rl")
    (d / "reward.py").write_text(REWARD)
    rows = [{"prompt": [{"role": "user", "content": f"Tell me about the number {i}, at some length."}]} for i in range(4)]
    (d / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _args(stage: str, model_dir, out, rl_files) -> list[str]:
    fill = {"{prompts}": f"data.train={rl_files / 'prompts.jsonl'}",
            "{reward}": f"rewards=[{{function: '{rl_files / 'reward.py'}:words'}}]"}
    command, *rest = STAGES[stage]
    return [command, f"model={model_dir}", f"output_dir={out}", "max_steps=1", "batch_size=2", "tensorboard=false",
            *(fill.get(a, a) for a in rest)]


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_stage_runs_a_step_from_the_cli(family, stage, family_dirs, rl_files, tmp_path, capsys):
    out = tmp_path / stage
    rc = main(_args(stage, family_dirs(family), out, rl_files))
    captured = capsys.readouterr()
    if stage == "rm" and family in NO_SEQUENCE_CLASSIFICATION:
        assert rc == 2 and "Traceback" not in captured.err and "sequence classification" in captured.err
        return
    assert rc == 0, captured.err[-3000:]
    assert (out / ("adapter_config.json" if stage != "sft-full" else "model.safetensors")).exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "train/loss" in r)
    assert math.isfinite(first["train/loss"])
    if stage == "dpo":  # the policy starts as its reference: every implicit reward is 0
        assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_eval_merge_and_serve_answer_for_every_family(family, family_dirs, tmp_path, capsys):
    from fastapi.testclient import TestClient
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from posttrain.commands.serve import ServeConfig, ServeSamplingSection
    from posttrain.serve.app import create_app
    from posttrain.serve.models import ModelRegistry
    from tests.serve.test_serve import FakeStore

    model_dir = family_dirs(family)
    adapter = tmp_path / "adapter"
    assert main(["sft", f"model={model_dir}", f"data.train={DATA / 'tiny_chat.jsonl'}", f"output_dir={adapter}",
                 "max_steps=2", "batch_size=4", "lr=5e-2", "warmup_ratio=0", "tensorboard=false"]) == 0
    assert main(["generate", f"model={model_dir}", f"adapter={adapter}", "prompt=[Name a colour]",
                 "sampling.max_new_tokens=5"]) == 0
    assert ">>> Name a colour" in capsys.readouterr().out
    assert main(["eval", f"model={model_dir}", f"adapter={adapter}", f"data={DATA / 'tiny_chat.jsonl'}",
                 "num_samples=1", "sampling.max_new_tokens=4"]) == 0
    assert "perplexity" in capsys.readouterr().out
    merged = tmp_path / "merged"
    assert main(["merge", f"model={model_dir}", f"adapter={adapter}", f"output_dir={merged}"]) == 0
    ids = torch.tensor([list(range(20, 50))])  # longer than the sliding windows
    with torch.no_grad():
        want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    cfg = ServeConfig(model=str(model_dir), model_name="base", adapters={"tuned": {"adapter": str(adapter), "version": "v1"}},
                      sampling=ServeSamplingSection(max_tokens=6))
    registry = ModelRegistry.load(cfg)
    registry.start()
    try:
        client = TestClient(create_app(registry, FakeStore(), cfg, ["k"]))
        for name in ("base", "tuned"):
            r = client.post("/v1/chat/completions", headers={"Authorization": "Bearer k"},
                            json={"model": name, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] >= 1
    finally:
        registry.stop()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_dpo_starts_at_log2_in_both_precisions(family, precision, family_dirs, tmp_path):
    """Whatever this CPU's default: fp32 (what an AVX2 CPU trains in) and bf16 (AVX512-BF16) both give a reference
    pass that equals the policy's bit for bit at step 1."""
    out = tmp_path / "dpo"
    assert main(["dpo", f"model={family_dirs(family)}", f"output_dir={out}", "max_steps=1", "batch_size=2",
                 "tensorboard=false", f"precision={precision}", f"data.train={DATA / 'tiny_prefs.jsonl'}"]) == 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
