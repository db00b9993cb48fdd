"""CLI commands end to end on the tiny model: sft via the CLI, generate, eval, merge, and user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from posttrain.cli import main
from tests import ROOT_DIR

ROOT = ROOT_DIR
DATA = ROOT / "examples" / "data" / "tiny_chat.jsonl"


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapter")
    rc = main(["sft", f"model={tiny_model_dir}", f"data.train={DATA}", f"output_dir={out}", "max_steps=2",
               "batch_size=4", "lr=5e-2", "warmup_ratio=0", "tensorboard=true", "lora.r=4"])
    assert rc == 0
    return out


def test_cli_sft_writes_a_peft_adapter_logs_and_tensorboard(tiny_adapter):
    assert (tiny_adapter / "adapter_config.json").exists()
    assert (tiny_adapter / "adapter_model.safetensors").exists()
    rows = [json.loads(x) for x in (tiny_adapter / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    assert any((tiny_adapter / "tensorboard").iterdir())
    assert json.loads((tiny_adapter / "posttrain_config.json").read_text())["lora"]["r"] == 4
    assert not (tiny_adapter / "config.json").exists()  # a PEFT dir holds no model config of its own


def test_generate_command(tiny_model_dir, tiny_adapter, capsys):
    rc = main(["generate", f"model={tiny_model_dir}", f"adapter={tiny_adapter}", "prompt=[Hello there, Name a colour]",
               "sampling.max_new_tokens=5"])
    assert rc == 0
    out = capsys.readouterr().out
    assert ">>> Hello there" in out and ">>> Name a colour" in out


def test_eval_command(tiny_model_dir, tiny_adapter, capsys):
    from posttrain.commands import eval as eval_command
    from posttrain.commands import load_config

    result = eval_command.run(load_config("eval", None, [f"model={tiny_model_dir}", f"adapter={tiny_adapter}",
                                                          f"data={DATA}", "num_samples=2", "sampling.max_new_tokens=4"]))
    assert result["rows"] == 12 and result["tokens"] > 0
    assert result["perplexity"] == pytest.approx(torch.exp(torch.tensor(result["loss"])).item(), rel=1e-4)
    assert len(result["samples"]) == 2


def test_merge_matches_adapter_logits_and_reloads_with_transformers(tiny_model_dir, tiny_adapter, tmp_path):
    merged_dir = tmp_path / "merged"
    assert main(["merge", f"model={tiny_model_dir}", f"adapter={tiny_adapter}", f"output_dir={merged_dir}"]) == 0
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    adapter_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        a, m, b = adapter_model(ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(m, a, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(b, a, atol=1e-5), "the adapter should have changed the logits"


def test_bad_row_is_reported_before_the_model_loads(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                   + "\n{not json\n" + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")

    def no_model(*a, **k):
        raise AssertionError("the model must not load before the data is validated")

    monkeypatch.setattr("posttrain.engine.setup.build_model", no_model)
    rc = main(["sft", f"data.train={bad}", f"output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"{bad}:2: malformed JSON" in err
    assert f"{bad}:3: messages[0].role: unknown role 'bot'" in err


def test_skip_invalid_reports_counts(tiny_model_dir, tmp_path, capsys):
    rows = [json.loads(x) for x in DATA.read_text().splitlines()]
    f = tmp_path / "mixed.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{oops\n" + json.dumps({"prompt": "x"}) + "\n")
    rc = main(["sft", f"model={tiny_model_dir}", f"data.train={f}", f"output_dir={tmp_path / 'o'}", "max_steps=1",
               "batch_size=2", "data.skip_invalid=true", "tensorboard=false"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "read 14 rows, kept 12" in out and "Skipped 2 rows as invalid" in out


def test_missing_file_and_wrong_adapter_are_user_errors(tiny_model_dir, tmp_path, capsys):
    assert main(["sft", f"data.train={tmp_path / 'nope.jsonl'}"]) == 2
    assert "nope.jsonl: file not found" in capsys.readouterr().err
    assert main(["generate", f"model={tiny_model_dir}", f"adapter={tmp_path}", "prompt=[hi]"]) == 2
    assert "not a PEFT adapter directory" in capsys.readouterr().err


def test_a_closed_output_pipe_ends_a_command_without_a_traceback():
    """`posttrain plan table=true | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "posttrain", "plan", "table=true"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, bufsize=0)
    proc.stdout.close()  # the reader is gone before the table is written (head -1 that already has its line)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, 141), err
    assert "Traceback" not in err and "BrokenPipe" not in err
