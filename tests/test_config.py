import pytest

from posttrain.cli import main
from posttrain.commands import load_config
from posttrain.commands.sft import SFTConfig
from posttrain.config import help_table
from posttrain.errors import ConfigError


def test_yaml_plus_dotted_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("method: lora\ndata:\n  train: a.jsonl\nlora:\n  r: 8\n  dora: true\nlr: 1.0e-4\n")
    cfg = load_config("sft", cfg_file, ["lora.r=32", "lr=3e-4", "lora.target_modules=[q_proj, v_proj]", "resume=true"])
    assert cfg.lora.r == 32 and cfg.lora.dora is True
    assert cfg.lr == pytest.approx(3e-4)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.resume is True and cfg.data.train == "a.jsonl"


def test_resume_accepts_a_path():
    assert load_config("sft", None, ["data.train=a", "resume=runs/x/checkpoints/step-00000003"]).resume.endswith("00003")


@pytest.mark.parametrize(
    "override, message",
    [
        ("lora.alhpa=3", "lora.alhpa: unknown key (did you mean alpha"),
        ("lr=fast", "lr: expected a number, got 'fast'"),
        ("method=adapter", "method: expected one of 'full', 'lora', 'qlora', 'prompt', 'prefix'"),
        ("batch_size=2.5", "batch_size: expected an integer, got 2.5"),
        ("lora=3", "lora: expected a section of keys"),
        ("batch_size=0", "batch_size: must be >= 1"),
        ("max_steps=0", "max_steps: must be a positive number"),
        ("data.skip_invalid=maybe", "data.skip_invalid: expected a boolean"),
    ],
)
def test_bad_keys_name_the_key_and_the_expectation(override, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config("sft", None, ["data.train=a.jsonl", override])
    assert message in str(e.value)


def test_missing_train_data_is_an_error():
    with pytest.raises(ConfigError, match="data.train: required"):
        load_config("sft", None, [])


def test_unknown_key_in_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  train: a.jsonl\n  shuffle: true\n")
    with pytest.raises(ConfigError, match="data.shuffle: unknown key"):
        load_config("sft", f)


def test_every_field_is_documented():
    for key, _default, text in help_table(SFTConfig):
        assert text, f"{key} has no help text"
    keys = {k for k, _, _ in help_table(SFTConfig)}
    required = {"model", "adapter", "method", "data.train", "data.eval", "output_dir", "max_steps", "epochs", "seed",
                "resume", "lr", "batch_size", "grad_accum", "max_length", "lora.r", "qlora.quant_type",
                "prompt.num_virtual_tokens", "prefix.num_virtual_tokens"}
    assert required <= keys


def test_cli_user_error_exits_2_without_traceback(capsys):
    assert main(["sft", "data.train=a.jsonl", "lora.rr=3"]) == 2
    err = capsys.readouterr().err
    assert "lora.rr: unknown key" in err and "Traceback" not in err


def test_cli_help_lists_keys_with_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    out = capsys.readouterr().out
    assert "lora.dora" in out and "[default: 16]" in out and "qlora.quant_type" in out
