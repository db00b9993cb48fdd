"""The RL rollout engine on the tiny random Llama: log-probs, greedy parity with ``generate``, seeding, grouping,
EOS and stop strings (rows leaving the batch), top-k/top-p filtering, LoRA adapters and ``Sampling`` validation.

The tiny model's hidden layers are re-drawn with a larger std (seeded) and its final norm scaled up after loading: at
the conftest's 0.02 init the tied-embedding model just repeats the last prompt token and its next-token distribution
is nearly uniform (every log-prob ~ -log V = -10.8), which would make greedy/EOS/stop-string checks trivial and
log-prob mismatches (e.g. a wrong position) hard to see.
"""

from __future__ import annotations

import types

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.rl.rollout import RolloutSampler, Sampling, completion_logps_reference, filter_logits

MAX_NEW = 12
TEXTS = ["Hello there, how are you today?", "Hi", "The quick brown fox jumps"]  # 8, 1 and 5 tokens: unsorted


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny (R>1, 64)-wide matmuls on 2 shared, busy cores: the 2-thread barrier costs ~15 ms per linear layer,
    # one thread runs them in microseconds. Restored after the module.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.normal_(0.0, 0.3, generator=g)
        model.model.norm.weight.fill_(20.0)  # logits x20: log-probs from about -1 to -10 instead of all ~-10.8
    return model.eval()


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from posttrain.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return _load(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(tok):
    ids = [tok(t)["input_ids"] for t in TEXTS]
    assert len({len(p) for p in ids}) == 3 and ids[0] != sorted(ids, key=len)[0]  # different lengths, unsorted
    return ids


def hf_greedy(model, prompt: list[int], max_new: int = MAX_NEW) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def greedy(model, prompts):
    """``model.generate(do_sample=False)`` of each prompt on its own."""
    return [hf_greedy(model, p) for p in prompts]


def assert_logps_match(model, prompts, completions, temperature):
    for c in completions:
        assert len(c.token_ids) == len(c.logprobs) == len(c.entropy) > 0
        ref = completion_logps_reference(model, prompts[c.prompt_index], c.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, rtol=0, atol=1e-4)
        assert all(e >= 0 for e in c.entropy)


# ------------------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (0.7, 50, 0.9)])
def test_sampled_logprobs_equal_a_plain_forward(model, tok, prompts, temperature, top_k, top_p):
    """Left-padded batch of 3 prompts x 3 samples; log-probs are log softmax(logits / T) before truncation."""
    engine = RolloutSampler(tok)
    sampling = Sampling(max_new_tokens=8, temperature=temperature, top_k=top_k, top_p=top_p)
    out = engine.generate(model, prompts, 3, sampling, generator=torch.Generator().manual_seed(1))
    assert len(out) == 9
    assert_logps_match(model, prompts, out, temperature)
    # The log-probs are informative (not a flat ~-log V = -10.8): a wrong position or prompt would show.
    assert max(max(c.logprobs) for c in out) > -4.0
    assert engine.stats.tokens == sum(len(c.token_ids) for c in out)
    # Entropy is that of the same (untruncated) softmax(logits / T) the log-prob comes from.
    c = out[4]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompts[1] + c.token_ids])).logits[0, len(prompts[1]) - 1 : -1] / temperature
    logp = logits.log_softmax(-1)
    torch.testing.assert_close(torch.tensor(c.entropy), -(logp.exp() * logp).sum(-1), rtol=0, atol=1e-3)
    # One prefill for all prompts (the n samples share it), then one forward per further token: L forwards for L tokens.
    assert engine.stats.forward_passes == max(len(c.token_ids) for c in out)


def test_greedy_equals_generate_for_each_prompt(model, tok, prompts, greedy):
    engine = RolloutSampler(tok)
    out = engine.generate(model, prompts, 2, Sampling(max_new_tokens=MAX_NEW, temperature=0))
    for i, ref in enumerate(greedy):
        assert len(set(ref)) > 3, "the tiny model should not just repeat one token"
        for c in out[2 * i : 2 * i + 2]:
            assert c.prompt_index == i
            assert c.token_ids == ref
            assert c.finish_reason == "length"
            assert c.text == tok.decode(ref, skip_special_tokens=True).strip()
    # Greedy log-probs are log softmax(logits) (temperature 0 is treated as 1 for the log-prob).
    assert_logps_match(model, prompts, out, 0.0)


def test_temperature_shapes_the_sampling_distribution(model, tok, prompts, greedy):
    # Sampling draws from softmax(logits / T): as T -> 0 that is the argmax, so T = 1e-4 reproduces greedy decoding
    # (drawing from softmax(logits) instead would not), while T = 1 samples differ from it.
    engine = RolloutSampler(tok)
    cold = engine.generate(model, prompts, 2, Sampling(max_new_tokens=MAX_NEW, temperature=1e-4),
                           generator=torch.Generator().manual_seed(0))
    assert [c.token_ids for c in cold] == [g for g in greedy for _ in range(2)]
    warm = engine.generate(model, prompts, 2, Sampling(max_new_tokens=MAX_NEW, temperature=1.0),
                           generator=torch.Generator().manual_seed(0))
    assert [c.token_ids for c in warm] != [c.token_ids for c in cold]


def test_same_seed_same_completions_different_seed_differs(model, tok, prompts):
    engine = RolloutSampler(tok)
    sampling = Sampling(max_new_tokens=8, temperature=1.0)

    def run(seed):
        out = engine.generate(model, prompts, 3, sampling, generator=torch.Generator().manual_seed(seed))
        return [c.token_ids for c in out], [c.logprobs for c in out]

    a, b, c = run(123), run(123), run(124)
    assert a == b
    assert a[0] != c[0]


def test_completions_are_grouped_in_the_callers_prompt_order(model, tok, prompts, greedy):
    # prompts_per_batch 2: sorted by length the order is [1, 2, 0] -> chunks [1, 2] and [0].
    engine = RolloutSampler(tok, prompts_per_batch=2)
    n = 3
    out = engine.generate(model, prompts, n, Sampling(max_new_tokens=MAX_NEW, temperature=0))
    assert [c.prompt_index for c in out] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i, c in enumerate(out):
        assert c.token_ids == greedy[i // n]
    # Sampled: each completion's log-probs match ITS prompt (a completion attached to the wrong prompt would not).
    out = engine.generate(model, prompts, n, Sampling(max_new_tokens=6), generator=torch.Generator().manual_seed(5))
    assert [c.prompt_index for c in out] == [i // n for i in range(len(prompts) * n)]
    assert_logps_match(model, prompts, out, 1.0)
    for c in out:
        wrong = completion_logps_reference(model, prompts[(c.prompt_index + 1) % 3], c.token_ids)
        assert not torch.allclose(torch.tensor(c.logprobs), wrong, atol=1e-4)


# ------------------------------------------------------------------------------------------------ EOS and stop strings


def test_eos_ends_a_row_and_the_others_continue(model, tok, prompts, greedy):
    # Take a token that prompt 2 (the middle row once sorted by length: [1, 2, 0]) produces at step k >= 2 and that no
    # other prompt's greedy output contains: as EOS it ends row 2 right after it; rows 1 and 0 go on unchanged.
    others = set(greedy[0]) | set(greedy[1])
    k = next(k for k in range(2, MAX_NEW - 2) if greedy[2][k] not in others and greedy[2][k] not in greedy[2][:k])
    eos = greedy[2][k]
    engine = RolloutSampler(tok, eos_token_ids=[eos])
    rows_per_forward = []
    hook = model.model.embed_tokens.register_forward_pre_hook(lambda _m, args: rows_per_forward.append(args[0].shape[0]))
    try:
        out = engine.generate(model, prompts, 2, Sampling(max_new_tokens=MAX_NEW, temperature=0))
    finally:
        hook.remove()
    for c in out[4:]:
        assert c.token_ids == greedy[2][: k + 1]
        assert c.token_ids[-1] == eos
        assert c.finish_reason == "stop"
    for c in out[:4]:
        assert c.token_ids == greedy[c.prompt_index]
        assert c.finish_reason == "length"
    # The two finished rows left the batch: 6 rows decode steps 1..k, then 4 rows.
    assert rows_per_forward[0] == 3  # one prefill per prompt
    assert rows_per_forward[1 : k + 1] == [6] * k
    assert rows_per_forward[k + 1 :] == [4] * (MAX_NEW - 1 - k)
    assert_logps_match(model, prompts, out, 0.0)


def test_eos_while_sampling_keeps_logprobs_right(model, tok, prompts):
    # Sampled rows finishing at different steps; the survivors' log-probs must stay aligned with their rows.
    # Up to the first finished row the draws equal an EOS-free probe with the same seed, so a token that one probe
    # row draws at step 1 and no other row draws in steps 0-1 ends that row at 2 tokens while others go on.
    # Two later probe tokens are added as EOS too (after a row leaves, the draws change: their effect varies).
    probe = RolloutSampler(tok).generate(model, prompts, 3, Sampling(max_new_tokens=8), generator=torch.Generator().manual_seed(7))
    first = next(c.token_ids[1] for c in probe if sum(c.token_ids[1] in d.token_ids[:2] for d in probe) == 1)
    eos_ids = sorted({first, probe[4].token_ids[4], probe[8].token_ids[6]})
    engine = RolloutSampler(tok, eos_token_ids=eos_ids)
    out = engine.generate(model, prompts, 3, Sampling(max_new_tokens=8), generator=torch.Generator().manual_seed(7))
    assert min(len(c.token_ids) for c in out) == 2 and max(len(c.token_ids) for c in out) > 2
    for c in out:
        stopped = [j for j, t in enumerate(c.token_ids) if t in eos_ids]
        if c.finish_reason == "stop":
            assert stopped == [len(c.token_ids) - 1]
        else:
            assert not stopped and len(c.token_ids) == 8
    assert_logps_match(model, prompts, out, 1.0)


def _ascii_word_stop(tok, ids: list[int]) -> tuple[str, int]:
    """A stop string made of a word that greedy decoding produces (first at token k >= 2), and k."""
    for k in range(2, len(ids) - 1):
        word = tok.decode(ids[k : k + 1]).strip()
        before = tok.decode(ids[:k], skip_special_tokens=True)
        if len(word) >= 3 and word.isascii() and word.isalpha() and word not in before:
            return word, k
    raise AssertionError("no usable word in the greedy output")


def test_stop_string_cuts_the_text(model, tok, prompts, greedy):
    stop, k = _ascii_word_stop(tok, greedy[0])
    full = tok.decode(greedy[0], skip_special_tokens=True)
    engine = RolloutSampler(tok)
    out = engine.generate(model, prompts, 1, Sampling(max_new_tokens=MAX_NEW, temperature=0, stop=[stop]))
    c = out[0]
    assert c.finish_reason == "stop"
    assert c.token_ids == greedy[0][: k + 1]  # ends with the token that completed the stop string
    assert stop not in c.text
    assert c.text == full[: full.find(stop)].strip()
    # Rows without the stop string go on to the length limit, token for token as generate.
    for i in (1, 2):
        if stop not in tok.decode(greedy[i], skip_special_tokens=True):
            assert out[i].token_ids == greedy[i] and out[i].finish_reason == "length"


def test_stop_string_spanning_two_tokens(model, tok, prompts, greedy):
    # The last 2 characters of token k's text plus the first 2 of token k+1's: complete only at token k+1.
    ids = greedy[2]
    for k in range(1, MAX_NEW - 2):
        a, b = tok.decode(ids[k : k + 1]), tok.decode(ids[k + 1 : k + 2])
        stop = (a[-2:] + b[:2]) if len(a) >= 2 and len(b) >= 2 else ""
        prefix = tok.decode(ids[: k + 1], skip_special_tokens=True)
        if stop.isascii() and stop.strip() == stop and len(stop) == 4 and stop not in prefix and a[-2:] not in prefix[:-2]:
            break
    else:
        raise AssertionError("no usable boundary in the greedy output")
    full = tok.decode(ids, skip_special_tokens=True)
    out = RolloutSampler(tok).generate(model, [prompts[2]], 1, Sampling(max_new_tokens=MAX_NEW, temperature=0, stop=[stop]))
    assert out[0].finish_reason == "stop"
    assert out[0].token_ids == ids[: k + 2]
    assert out[0].text == full[: full.find(stop)].strip()
    assert stop not in out[0].text


def test_no_stop_without_eos_or_stop_string(model, tok, prompts, greedy):
    out = RolloutSampler(tok, eos_token_ids=[]).generate(
        model, prompts, 1, Sampling(max_new_tokens=MAX_NEW, temperature=0, stop=["\x00never\x00", ""]))
    assert [c.token_ids for c in out] == greedy
    assert all(c.finish_reason == "length" for c in out)


# ------------------------------------------------------------------------------------------------ filter_logits

# Row 0 probabilities, shuffled so that sorting matters: [0.1, 0.5, 0.05, 0.2, 0.15]; sorted 0.5, 0.2, 0.15, 0.1, 0.05.
# Row 1 is another permutation: [0.2, 0.05, 0.5, 0.15, 0.1].
PROBS = torch.tensor([[0.1, 0.5, 0.05, 0.2, 0.15], [0.2, 0.05, 0.5, 0.15, 0.1]], dtype=torch.float64)
LOGITS = PROBS.log() + 3.0  # any shift: same softmax


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [sorted(torch.isfinite(row).nonzero().squeeze(-1).tolist()) for row in logits]


def test_top_k_keeps_exactly_k():
    assert kept(filter_logits(LOGITS, 2, 1.0)) == [[1, 3], [0, 2]]  # 0.5 and 0.2
    assert kept(filter_logits(LOGITS, 1, 1.0)) == [[1], [2]]  # the top token
    assert kept(filter_logits(LOGITS, 3, 1.0)) == [[1, 3, 4], [0, 2, 3]]
    for k in (0, 5, 9):  # off, or not smaller than the vocabulary
        assert torch.equal(filter_logits(LOGITS, k, 1.0), LOGITS)
    out = filter_logits(LOGITS, 2, 1.0)
    assert torch.equal(out[0, [1, 3]], LOGITS[0, [1, 3]])  # kept logits are unchanged


@pytest.mark.parametrize("top_p, expected", [
    # A token is dropped when the probability of the tokens ranked before it already reaches top_p.
    (0.65, [[1, 3], [0, 2]]),  # before 0.2: 0.5 < 0.65 keep; before 0.15: 0.7 >= 0.65 drop -> {0.5, 0.2}, sums 0.7
    (0.75, [[1, 3, 4], [0, 2, 3]]),  # before 0.15: 0.7 < 0.75 keep; before 0.1: 0.85 drop -> {0.5, 0.2, 0.15}
    (0.3, [[1], [2]]),  # before 0.2: 0.5 >= 0.3 -> only the top token
    (1e-9, [[1], [2]]),  # the top token is always kept
    (0.999, [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]),  # before 0.05: 0.95 < 0.999 -> keep all
])
def test_top_p_keeps_the_smallest_nucleus(top_p, expected):
    out = filter_logits(LOGITS, 0, top_p)
    assert kept(out) == expected
    for row, cols in enumerate(expected):
        assert torch.equal(out[row, cols], LOGITS[row, cols])


def test_top_k_then_top_p_renormalises():
    # top_k 3 leaves {0.5, 0.2, 0.15} renormalised: 0.5882, 0.2353, 0.1765. top_p 0.8: before the third 0.8235 >= 0.8
    # -> drop it -> {0.5, 0.2}. (top_p 0.8 alone keeps 3: before 0.15 the mass is 0.7 < 0.8.)
    assert kept(filter_logits(LOGITS, 3, 0.8)) == [[1, 3], [0, 2]]
    assert kept(filter_logits(LOGITS, 0, 0.8)) == [[1, 3, 4], [0, 2, 3]]


def test_top_token_kept_even_with_extreme_logits():
    logits = torch.tensor([[100.0, 0.0, -5.0, 1.0]])
    assert kept(filter_logits(logits, 1, 1e-6)) == [[0]]
    assert kept(filter_logits(logits, 0, 0.5)) == [[0]]


# ------------------------------------------------------------------------------------------------ LoRA


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(_load(tiny_model_dir), config)


def test_lora_generates_with_the_adapter_applied(lora_model, tok, prompts):
    base_weight = lora_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    lora_model.train()
    engine = RolloutSampler(tok)
    out = engine.generate(lora_model, prompts, 1, Sampling(max_new_tokens=MAX_NEW, temperature=0))
    assert lora_model.training  # the caller's mode is restored
    lora_model.eval()
    differs = 0
    for p, c in zip(prompts, out):
        assert c.token_ids == hf_greedy(lora_model, p)
        with lora_model.disable_adapter():
            base = hf_greedy(lora_model, p)
        differs += c.token_ids != base
    assert differs == len(prompts)
    # Never merged: the base weight is untouched and the adapter still switches off.
    assert torch.equal(lora_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, base_weight)
    with lora_model.disable_adapter():
        off = engine.generate(lora_model, prompts, 1, Sampling(max_new_tokens=MAX_NEW, temperature=0))
    assert [c.token_ids for c in off] != [c.token_ids for c in out]
    # Sampled log-probs equal the PeftModel's own plain forward.
    sampled = engine.generate(lora_model, prompts, 2, Sampling(max_new_tokens=8, temperature=0.8),
                              generator=torch.Generator().manual_seed(3))
    assert_logps_match(lora_model, prompts, sampled, 0.8)


def test_fp32_lora_decodes_through_weights_merged_once(tiny_model_dir, tok, prompts, monkeypatch):
    """With posttrain's LoRA routing (models/fused_lora.py) a CPU rollout decodes through W + s B A formed once per
    rollout: the sampled log-probs still equal the PeftModel's plain forward (within fp32 rounding), the base
    weights are untouched and the copies gone afterwards; ``POSTTRAIN_DECODE_MERGE=0``, no memory to spare, or a
    forward with gradients use PEFT's own branch."""
    from peft import LoraConfig, get_peft_model

    from posttrain.models import fused_lora

    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(_load(tiny_model_dir), config)
    routed = fused_lora.enable(model)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    base_weight = q_proj.base_layer.weight.detach().clone()
    merges = []
    original = fused_lora.merged_for_decoding

    def spy(m):
        ctx = original(m)

        class Wrapped:
            def __enter__(self):
                count = ctx.__enter__()
                merges.append((count, torch.allclose(q_proj._posttrain_merged, q_proj.base_layer.weight + float(
                    q_proj.scaling["default"]) * q_proj.lora_B["default"].weight @ q_proj.lora_A["default"].weight,
                    atol=1e-6)))
                return count

            def __exit__(self, *exc):
                return ctx.__exit__(*exc)

        return Wrapped()

    monkeypatch.setattr(fused_lora, "merged_for_decoding", spy)
    engine = RolloutSampler(tok)
    sampled = engine.generate(model, prompts, 2, Sampling(max_new_tokens=8, temperature=0.8),
                              generator=torch.Generator().manual_seed(3))
    assert merges == [(routed, True)] and routed == 7 * model.config.num_hidden_layers
    assert_logps_match(model, prompts, sampled, 0.8)
    assert torch.equal(q_proj.base_layer.weight, base_weight) and not hasattr(q_proj, "_posttrain_merged")
    monkeypatch.setattr(fused_lora, "merged_for_decoding", original)
    for setting in ("env", "memory"):
        if setting == "env":
            monkeypatch.setenv("POSTTRAIN_DECODE_MERGE", "0")
        else:
            monkeypatch.delenv("POSTTRAIN_DECODE_MERGE")
            monkeypatch.setattr(fused_lora, "_available_bytes", lambda: 1000)
        with fused_lora.merged_for_decoding(model) as count:
            assert count == 0 and not hasattr(q_proj, "_posttrain_merged")
    monkeypatch.undo()
    x = torch.randn(2, 3, q_proj.in_features, requires_grad=True)
    with fused_lora.merged_for_decoding(model) as count:
        assert count == routed
        q_proj.lora_B["default"].weight.grad = None
        q_proj(x).sum().backward()  # with gradients: PEFT's branch, the adapter gets its gradient
        assert q_proj.lora_B["default"].weight.grad is not None


def test_prompt_tuning_is_rejected(tiny_model_dir, tok, prompts):
    from peft import PromptTuningConfig, get_peft_model

    peft_model = get_peft_model(_load(tiny_model_dir), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ConfigError, match="prompt/prefix"):
        RolloutSampler(tok).generate(peft_model, prompts, 1, Sampling(max_new_tokens=2))


# ------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("kwargs, field", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
])
def test_sampling_rejects_bad_values(kwargs, field):
    with pytest.raises(ConfigError, match=f"sampling.{field}"):
        Sampling(**kwargs)


def test_sampling_accepts_edge_values():
    s = Sampling(max_new_tokens=1, temperature=0.0, top_p=1.0, top_k=0)
    assert s.stop == [] and Sampling().stop is not s.stop  # no shared mutable default


def test_engine_needs_a_pad_token():
    with pytest.raises(ConfigError, match="pad token"):
        RolloutSampler(types.SimpleNamespace(pad_token_id=None, eos_token_id=2))
