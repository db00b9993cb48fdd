"""The family matrix, what is adapted: LoRA targets for fused projections (Phi-3) and mixture-of-experts models
(Qwen3-MoE, gpt-oss), routers frozen, and the routers' load-balancing loss trained as transformers trains it."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.commands import load_config
from posttrain.errors import ConfigError
from posttrain.models.adapters import build_model
from tests.families import build_family

MOE = ["qwen3_moe", "gpt_oss"]


def build(model_dir, *overrides):
    cfg = load_config("sft", None, [f"model={model_dir}", "data.train=unused.jsonl", "precision=fp32", *overrides])
    return build_model(cfg)[0]


def _adapted(model) -> set[str]:
    """Layer-0 paths that carry a LoRA pair, e.g. self_attn.q_proj, mlp.experts."""
    names = set()
    for name, _ in model.named_parameters():
        if "lora_A" in name and ".layers.0." in name:
            names.add(name.split(".layers.0.")[1].split(".lora_A")[0].replace(".base_layer", ""))
    return names


def test_phi3_fused_projections_are_adapted_by_all_linear_and_by_name(family_dirs):
    assert _adapted(build(family_dirs("phi3"))) == {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                                                     "mlp.down_proj"}
    assert _adapted(build(family_dirs("phi3"), "lora.target_modules=[qkv_proj]")) == {"self_attn.qkv_proj"}


@pytest.mark.parametrize("family", MOE)
def test_moe_all_linear_adapts_attention_and_never_the_router(family, family_dirs):
    model = build(family_dirs(family))
    assert _adapted(model) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # experts, routers, norms frozen


@pytest.mark.parametrize("family", MOE)
def test_moe_target_experts_adapts_each_expert_and_merges_exactly(family, family_dirs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = build(family_dirs(family), "lora.target_experts=true")
    assert _adapted(model) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                               "mlp.experts"}
    assert not any("router" in n or ".gate." in n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # a trained-looking adapter, so the experts' update is not zero
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([list(range(30, 60))])
    base = lambda: AutoModelForCausalLM.from_pretrained(family_dirs(family))  # noqa: E731
    with torch.no_grad():
        adapter = PeftModel.from_pretrained(base(), tmp_path / "adapter").eval()
        want = adapter(ids).logits
        merged = adapter.merge_and_unload()(ids).logits
        plain = base()(ids).logits
    torch.testing.assert_close(merged, want, rtol=1e-4, atol=1e-4)
    assert (plain - want).abs().max() > 1e-2
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]


def test_target_experts_is_refused_where_it_cannot_apply(family_dirs):
    with pytest.raises(ConfigError, match="no experts"):
        build(family_dirs("llama"), "lora.target_experts=true")
    with pytest.raises(ConfigError, match="DoRA"):
        build(family_dirs("qwen3_moe"), "lora.target_experts=true", "lora.dora=true")


@pytest.fixture(scope="module")
def moe_with_router_loss(tmp_path_factory, tokenizer):
    out = build_family("qwen3_moe", tokenizer, tmp_path_factory.mktemp("qwen3_moe_aux"))
    config = json.loads((out / "config.json").read_text())
    config.update(output_router_logits=True, router_aux_loss_coef=0.5)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_router_loss_is_transformers_own_loss_term(moe_with_router_loss):
    """With output_router_logits, posttrain's SFT loss plus the collected router term equals transformers'
    labelled loss (mean token NLL + coef * load-balancing loss), and so do the gradients."""
    from transformers import AutoModelForCausalLM

    from posttrain.data.batching import collate_sft
    from posttrain.data.tokenize import TokenizedExample
    from posttrain.models import router
    from posttrain.models.forward import target_logps

    ex = [TokenizedExample(list(range(40, 70)), [0] * 5 + [1] * 25), TokenizedExample(list(range(80, 98)), [1] * 18)]
    batch = collate_sft(ex, pad_id=0)
    ours = AutoModelForCausalLM.from_pretrained(moe_with_router_loss)
    theirs = AutoModelForCausalLM.from_pretrained(moe_with_router_loss)
    with router.collecting() as collected:
        logps, _ = target_logps(ours, batch)
    assert len(collected) == 1
    loss = -logps.sum() / logps.numel() + collected[0]
    loss.backward()
    reference = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    reference.loss.backward()
    torch.testing.assert_close(loss, reference.loss, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    with torch.no_grad(), router.collecting() as collected:
        target_logps(ours, batch)
    assert collected == []  # reference and rollout passes add nothing


def test_router_loss_reaches_training_and_its_log(moe_with_router_loss, tmp_path, family_dirs):
    from posttrain.cli import main
    from tests.stages.test_families_stages import DATA

    for model_dir, logged in ((moe_with_router_loss, True), (family_dirs("qwen3_moe"), False)):
        out = tmp_path / str(logged)
        assert main(["sft", f"model={model_dir}", f"data.train={DATA / 'tiny_chat.jsonl'}", f"output_dir={out}",
                     "max_steps=1", "batch_size=4", "tensorboard=false"]) == 0
        row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        assert ("train/router_aux" in row) is logged
        if logged:
            assert row["train/router_aux"] > 0
