"""Checkpoints: a resumed run must match an uninterrupted one bit for bit, and nothing is pickled."""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from posttrain.engine import checkpoint as ckpt_module
from posttrain.engine.checkpoint import (
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    save_rng_state,
)
from posttrain.errors import PosttrainError

EXPECTED_FILES = {
    "trainable.safetensors",
    "optimizer.safetensors",
    "optimizer.json",
    "scheduler.json",
    "rng-rank0.json",
    "trainer_state.json",
    "COMPLETE",
}


class TinyNet(nn.Module):
    """A frozen input projection, then trainable layers; dropout so the forward pass consumes RNG."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.embed = nn.Linear(8, hidden)
        self.hidden = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(hidden, 1)
        self.embed.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(torch.relu(self.hidden(self.embed(x)))))


def _lr_lambda(step: int) -> float:
    return min(1.0, (step + 1) / 2) * 0.8**step


def build(hidden: int = 16, perturb_seed: int | None = None):
    """Model (frozen weights from seed 0), AdamW with two param groups, LambdaLR warmup+decay."""
    torch.manual_seed(0)
    model = TinyNet(hidden)
    if perturb_seed is not None:  # so a load that forgets a trainable tensor cannot pass by accident
        generator = torch.Generator().manual_seed(perturb_seed)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=generator))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in trainable if n.endswith("weight")], "weight_decay": 0.1},
            {"params": [p for n, p in trainable if n.endswith("bias")], "weight_decay": 0.0},
        ],
        lr=1e-2,
        betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda)
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler) -> float:
    """One step on fresh random data; python and numpy RNG scale the loss so their restore matters too."""
    x = torch.randn(4, 8)  # (B, in)
    y = torch.randn(4, 1)  # (B, 1)
    scale = 1.0 + random.random() + float(np.random.rand())
    loss = ((model(x) * scale - y) ** 2).mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def save(output_dir: Path, step: int, model, optimizer, scheduler, keep_last: int = 3, **kwargs) -> Path:
    return save_checkpoint(
        output_dir,
        step,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        trainer_state={"samples_seen": step * 4},
        keep_last=keep_last,
        **kwargs,
    )


def scramble_rng() -> None:
    torch.manual_seed(12345)
    random.seed(12345)
    np.random.seed(12345)


def assert_optimizer_states_equal(actual: dict, expected: dict) -> None:
    assert actual["param_groups"] == expected["param_groups"]
    assert actual["state"].keys() == expected["state"].keys()
    for index, expected_state in expected["state"].items():
        assert actual["state"][index].keys() == expected_state.keys()
        for key, value in expected_state.items():
            assert torch.equal(actual["state"][index][key], value), (index, key)
            assert actual["state"][index][key].dtype == value.dtype, (index, key)


@pytest.fixture
def no_pickle(monkeypatch):
    """Make any torch.save / torch.load call fail the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("checkpointing must not pickle (torch.save/torch.load called)")

    monkeypatch.setattr(torch, "save", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)


def test_resumed_run_matches_uninterrupted_run_bit_for_bit(tmp_path, no_pickle):
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model, optimizer, scheduler = build()
    for _ in range(3):
        train_step(model, optimizer, scheduler)
    ckpt = save(tmp_path, 3, model, optimizer, scheduler)
    saved_optimizer_state = copy.deepcopy(optimizer.state_dict())
    saved_scheduler_state = copy.deepcopy(scheduler.state_dict())

    expected_losses = [train_step(model, optimizer, scheduler) for _ in range(3)]
    expected_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected_optimizer_state = copy.deepcopy(optimizer.state_dict())
    expected_lr = scheduler.get_last_lr()

    resumed_model, resumed_optimizer, resumed_scheduler = build(perturb_seed=99)
    scramble_rng()
    trainer_state = load_checkpoint(
        ckpt, model=resumed_model, optimizer=resumed_optimizer, scheduler=resumed_scheduler
    )
    assert trainer_state == {"samples_seen": 12, "step": 3}
    assert_optimizer_states_equal(resumed_optimizer.state_dict(), saved_optimizer_state)
    assert resumed_scheduler.state_dict() == saved_scheduler_state

    resumed_losses = [train_step(resumed_model, resumed_optimizer, resumed_scheduler) for _ in range(3)]
    assert resumed_losses == expected_losses
    for name, param in resumed_model.named_parameters():
        assert torch.equal(param, expected_params[name]), name
    assert_optimizer_states_equal(resumed_optimizer.state_dict(), expected_optimizer_state)
    assert resumed_scheduler.get_last_lr() == expected_lr


def test_checkpoint_layout_holds_only_safetensors_and_json(tmp_path, no_pickle):
    model, optimizer, scheduler = build()
    train_step(model, optimizer, scheduler)
    ckpt = save(tmp_path, 12, model, optimizer, scheduler)

    assert ckpt == tmp_path / "checkpoints" / "step-00000012"
    assert {p.name for p in ckpt.iterdir()} == EXPECTED_FILES
    assert [p for p in tmp_path.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle"}] == []
    for path in ckpt.glob("*.json"):
        json.loads(path.read_text())  # plain JSON, not something that only looks like it

    trainable = load_file(str(ckpt / "trainable.safetensors"))
    assert set(trainable) == {"hidden.weight", "hidden.bias", "head.weight", "head.bias"}  # no frozen embed
    optimizer_tensors = load_file(str(ckpt / "optimizer.safetensors"))
    assert set(optimizer_tensors) == {f"state.{i}.{k}" for i in range(4) for k in ("step", "exp_avg", "exp_avg_sq")}
    assert optimizer_tensors["state.0.step"].shape == ()  # AdamW's step is a 0-d tensor, kept as one
    assert json.loads((ckpt / "trainer_state.json").read_text()) == {"samples_seen": 48, "step": 12}


def test_save_before_first_step_round_trips(tmp_path):
    model, optimizer, scheduler = build()
    ckpt = save(tmp_path, 0, model, optimizer, scheduler)  # empty optimizer state
    fresh_model, fresh_optimizer, fresh_scheduler = build(perturb_seed=1)
    load_checkpoint(ckpt, model=fresh_model, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    assert fresh_optimizer.state_dict()["state"] == {}
    for (name, param), fresh in zip(model.named_parameters(), fresh_model.parameters()):
        assert torch.equal(param, fresh), name


def test_optimizer_tensor_in_param_groups_round_trips():
    state_dict = {
        "state": {0: {"step": torch.tensor(3.0), "momentum_buffer": torch.ones(2), "count": 7}},
        "param_groups": [{"lr": torch.tensor(0.5), "betas": (0.9, 0.99), "params": [0]}],
    }
    tensors, rest = ckpt_module._flatten_optimizer_state(state_dict)
    restored = ckpt_module._unflatten_optimizer_state(
        tensors, json.loads(json.dumps(rest)), template=state_dict
    )
    assert restored["state"][0]["count"] == 7
    assert torch.equal(restored["state"][0]["momentum_buffer"], torch.ones(2))
    assert torch.equal(restored["param_groups"][0]["lr"], torch.tensor(0.5))
    assert restored["param_groups"][0]["betas"] == (0.9, 0.99)


def test_keep_last_prunes_oldest_complete_checkpoints(tmp_path):
    model, optimizer, scheduler = build()
    for step in range(1, 6):
        train_step(model, optimizer, scheduler)
        save(tmp_path, step, model, optimizer, scheduler, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 5)


def test_keep_last_never_deletes_the_checkpoint_just_written(tmp_path):
    model, optimizer, scheduler = build()
    save(tmp_path, 9, model, optimizer, scheduler, keep_last=1)  # e.g. left by an earlier run
    just_written = save(tmp_path, 2, model, optimizer, scheduler, keep_last=1)
    assert just_written.is_dir()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000009"]


def test_keep_last_must_be_positive(tmp_path):
    model, optimizer, scheduler = build()
    with pytest.raises(PosttrainError, match="keep_last"):
        save(tmp_path, 1, model, optimizer, scheduler, keep_last=0)


def test_resaving_the_same_step_replaces_it(tmp_path):
    model, optimizer, scheduler = build()
    save(tmp_path, 1, model, optimizer, scheduler)
    train_step(model, optimizer, scheduler)
    ckpt = save(tmp_path, 1, model, optimizer, scheduler)
    assert {p.name for p in ckpt.iterdir()} == EXPECTED_FILES
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]
    assert torch.equal(load_file(str(ckpt / "trainable.safetensors"))["head.bias"], model.head.bias.detach())


def test_incomplete_directories_are_ignored(tmp_path):
    model, optimizer, scheduler = build()
    complete = save(tmp_path, 1, model, optimizer, scheduler)
    unmarked = checkpoint_dir(tmp_path, 5)
    shutil.copytree(complete, unmarked)
    (unmarked / "COMPLETE").unlink()
    shutil.copytree(complete, tmp_path / "checkpoints" / ".tmp-step-00000007")  # a crashed save

    assert latest_checkpoint(tmp_path) == complete
    assert resolve_resume(tmp_path, True) == complete
    with pytest.raises(PosttrainError, match="incomplete"):
        load_checkpoint(unmarked, model=model, optimizer=optimizer, scheduler=scheduler)


def test_crash_mid_save_leaves_no_checkpoint_and_next_save_cleans_up(tmp_path, monkeypatch):
    model, optimizer, scheduler = build()
    first = save(tmp_path, 1, model, optimizer, scheduler)
    write_text = ckpt_module._write_text

    def crash_before_marker(path: Path, text: str) -> None:
        if path.name == "COMPLETE":
            raise OSError("disk full")
        write_text(path, text)

    monkeypatch.setattr(ckpt_module, "_write_text", crash_before_marker)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2, model, optimizer, scheduler)
    assert not checkpoint_dir(tmp_path, 2).exists()
    assert latest_checkpoint(tmp_path) == first

    monkeypatch.setattr(ckpt_module, "_write_text", write_text)
    second = save(tmp_path, 3, model, optimizer, scheduler)
    assert latest_checkpoint(tmp_path) == second
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001", "step-00000003"]


def test_unserialisable_trainer_state_writes_nothing(tmp_path):
    model, optimizer, scheduler = build()
    with pytest.raises(TypeError, match="trainer_state"):
        save_checkpoint(
            tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler,
            trainer_state={"when": object()}, keep_last=1,
        )
    assert not (tmp_path / "checkpoints").exists() or list((tmp_path / "checkpoints").iterdir()) == []


@pytest.mark.parametrize("make_path", [
    lambda root: root,  # an existing directory that is not a checkpoint
    lambda root: root / "missing",
    lambda root: root / "step-00000001",  # named like one, but does not exist
])
def test_loading_a_non_checkpoint_raises(tmp_path, make_path):
    model, optimizer, scheduler = build()
    with pytest.raises(PosttrainError, match="not a checkpoint"):
        load_checkpoint(make_path(tmp_path), model=model, optimizer=optimizer, scheduler=scheduler)


def test_load_rejects_mismatched_trainable_parameters(tmp_path):
    model, optimizer, scheduler = build()
    ckpt = save(tmp_path, 1, model, optimizer, scheduler)

    wider, wider_optimizer, wider_scheduler = build(hidden=32)
    with pytest.raises(PosttrainError, match=r"'hidden\.weight' has shape \(16, 16\).*\(32, 32\)"):
        load_checkpoint(ckpt, model=wider, optimizer=wider_optimizer, scheduler=wider_scheduler)

    unfrozen, unfrozen_optimizer, unfrozen_scheduler = build()
    unfrozen.embed.requires_grad_(True)
    with pytest.raises(PosttrainError, match=r"missing from the checkpoint: embed\.bias, embed\.weight"):
        load_checkpoint(ckpt, model=unfrozen, optimizer=unfrozen_optimizer, scheduler=unfrozen_scheduler)


def test_each_rank_restores_its_own_rng_state(tmp_path):
    model, optimizer, scheduler = build()
    with pytest.raises(PosttrainError, match="main rank must call save_checkpoint first"):
        save(tmp_path, 4, model, optimizer, scheduler, rank=1, is_main=False)

    torch.manual_seed(100)
    ckpt = save(tmp_path, 4, model, optimizer, scheduler, rank=0, is_main=True)
    rank0_draw = torch.randn(3)
    torch.manual_seed(101)
    assert save(tmp_path, 4, model, optimizer, scheduler, rank=1, is_main=False) == ckpt
    rank1_draw = torch.randn(3)
    torch.manual_seed(102)
    save_rng_state(ckpt, rank=2)
    rank2_draw = torch.randn(3)
    assert {p.name for p in ckpt.iterdir()} == EXPECTED_FILES | {"rng-rank1.json", "rng-rank2.json"}

    for rank, expected in [(0, rank0_draw), (1, rank1_draw), (2, rank2_draw), (7, rank0_draw)]:
        scramble_rng()
        load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, rank=rank)
        assert torch.equal(torch.randn(3), expected), rank


def test_resolve_resume(tmp_path):
    output_dir = tmp_path / "run"
    assert resolve_resume(output_dir, False) is None
    assert resolve_resume(output_dir, True) is None  # nothing saved yet: a fresh start
    with pytest.raises(PosttrainError, match="does not exist"):
        resolve_resume(output_dir, str(output_dir))
    output_dir.mkdir()
    with pytest.raises(PosttrainError, match="no complete checkpoint"):
        resolve_resume(output_dir, str(output_dir))

    model, optimizer, scheduler = build()
    first = save(output_dir, 1, model, optimizer, scheduler)
    second = save(output_dir, 2, model, optimizer, scheduler)
    assert resolve_resume(output_dir, True) == second
    assert resolve_resume(tmp_path / "elsewhere", str(first)) == first
    assert resolve_resume(tmp_path / "elsewhere", str(output_dir)) == second
    assert resolve_resume(tmp_path / "elsewhere", str(output_dir / "checkpoints")) == second

    (second / "COMPLETE").unlink()
    with pytest.raises(PosttrainError, match="incomplete"):
        resolve_resume(output_dir, str(second))
    assert resolve_resume(output_dir, True) == first


def _tiny_lora_model(lora_seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    # LoRA's B starts at zero; random adapters make a wrong or skipped load visible.
    generator = torch.Generator().manual_seed(lora_seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda)
    return model, optimizer, scheduler


def test_peft_lora_adapters_round_trip(tmp_path, no_pickle):
    model, optimizer, scheduler = _tiny_lora_model(lora_seed=1)
    input_ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    scheduler.step()
    ckpt = save(tmp_path, 1, model, optimizer, scheduler)

    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    saved = load_file(str(ckpt / "trainable.safetensors"))
    assert set(saved) == trainable_names
    assert len(saved) == 4 and all(".lora_A." in n or ".lora_B." in n for n in saved)

    resumed, resumed_optimizer, resumed_scheduler = _tiny_lora_model(lora_seed=2)
    load_checkpoint(ckpt, model=resumed, optimizer=resumed_optimizer, scheduler=resumed_scheduler)
    for (name, param), resumed_param in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(param, resumed_param), name
    assert_optimizer_states_equal(resumed_optimizer.state_dict(), optimizer.state_dict())
    with torch.no_grad():
        expected = model(input_ids=input_ids, labels=input_ids).loss
        assert torch.equal(resumed(input_ids=input_ids, labels=input_ids).loss, expected)
