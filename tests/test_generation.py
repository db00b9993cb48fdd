"""generate(): batching, padding, order, and PEFT adapters (LoRA, prompt tuning, prefix tuning)."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM

from posttrain import generation
from posttrain.errors import ConfigError
from posttrain.generation import SamplingConfig, chat_loop, generate

# Raw prompts of different lengths, deliberately not sorted by length. (A random model given a chat
# prompt mostly repeats the final newline, which strips to ""; raw text gives it something to copy.)
PROMPTS = [
    "raw text prompt",
    "a much longer prompt with many more words in it, so the batch needs padding",
    "x",
    "The quick brown fox jumps over",
    "one two three four five six",
]
GREEDY = SamplingConfig(max_new_tokens=6)


@pytest.fixture(autouse=True)
def one_thread():
    # The tiny model's matmuls are too small to split: a second thread only adds sync overhead.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model(tiny_model_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def reference_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding the slow, obviously right way: one unpadded prompt, a full forward per token."""
    ids = tokenizer(prompt).input_ids
    new_ids: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            x = torch.tensor([ids + new_ids])
            token = int(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new_ids.append(token)
    return tokenizer.decode(new_ids, skip_special_tokens=True).strip()


def test_greedy_same_for_any_batch_size_and_order(tiny_model, tokenizer):
    one = generate(tiny_model, tokenizer, PROMPTS, GREEDY, batch_size=1)
    four = generate(tiny_model, tokenizer, PROMPTS, GREEDY, batch_size=4)
    assert one == four
    assert any(one), "the random model should produce some visible text"
    assert generate(tiny_model, tokenizer, PROMPTS[::-1], GREEDY, batch_size=4) == four[::-1]
    assert one[0] == reference_greedy(tiny_model, tokenizer, PROMPTS[0], GREEDY.max_new_tokens)


def test_restores_padding_side_and_train_mode(tiny_model, tokenizer):
    assert tokenizer.padding_side == "right"
    tiny_model.train()
    generate(tiny_model, tokenizer, PROMPTS[:2], GREEDY, batch_size=2)
    assert tokenizer.padding_side == "right"
    assert tiny_model.training


def test_chat_prompts_use_the_template(tiny_model, tokenizer, monkeypatch):
    seen = []
    real_new_token_ids = generation._new_token_ids

    def spy(model, input_ids, attention_mask, pad_token_id, sampling):
        seen.append(input_ids[0][attention_mask[0].bool()].tolist())
        return real_new_token_ids(model, input_ids, attention_mask, pad_token_id, sampling)

    monkeypatch.setattr(generation, "_new_token_ids", spy)
    messages = [{"role": "user", "content": "hi"}]
    (completion,) = generate(tiny_model, tokenizer, [messages], GREEDY)
    assert isinstance(completion, str)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert seen == [tokenizer(text, add_special_tokens=False).input_ids]


def test_lora_model_generates_like_base_at_init(tiny_model, tokenizer):
    base = generate(tiny_model, tokenizer, PROMPTS, GREEDY, batch_size=4)
    lora = get_peft_model(tiny_model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["q_proj", "v_proj"]))
    # LoRA's B matrix starts at zero, so the adapter is the identity until trained.
    assert generate(lora, tokenizer, PROMPTS, GREEDY, batch_size=4) == base


@pytest.mark.parametrize(
    "peft_config",
    [
        PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5),
        PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5),
    ],
    ids=["prompt_tuning", "prefix_tuning"],
)
def test_prompt_learning_matches_forward_with_left_padding(tiny_model, tokenizer, peft_config):
    base = generate(tiny_model, tokenizer, PROMPTS, GREEDY, batch_size=4)
    torch.manual_seed(0)
    model = get_peft_model(tiny_model, peft_config)
    with torch.no_grad():
        for param in model.prompt_encoder.parameters():
            param.mul_(30)  # make the random virtual tokens matter, so a dropped prefix shows
    one = generate(model, tokenizer, PROMPTS, GREEDY, batch_size=1)
    four = generate(model, tokenizer, PROMPTS, GREEDY, batch_size=4)  # left-padded batches
    assert one == four
    assert one != base, "the adapter must change the output (PeftModel.generate drops a prefix)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft's forward still says past_key_values
        expected = [reference_greedy(model, tokenizer, p, GREEDY.max_new_tokens) for p in PROMPTS]
    assert four == expected


def test_sampling_runs_and_is_seeded(tiny_model, tokenizer):
    sampling = SamplingConfig(max_new_tokens=5, temperature=0.9, top_p=0.9, top_k=20)
    torch.manual_seed(1)
    first = generate(tiny_model, tokenizer, PROMPTS, sampling, batch_size=2)
    torch.manual_seed(1)
    assert generate(tiny_model, tokenizer, PROMPTS, sampling, batch_size=2) == first


@pytest.mark.parametrize(
    "fields", [{"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -1}]
)
def test_sampling_config_rejects_bad_values(fields):
    with pytest.raises(ConfigError):
        SamplingConfig(**fields)


def test_chat_loop_keeps_history_and_resets(monkeypatch, capsys):
    calls = []

    def fake_generate(model, tokenizer, prompts, sampling, batch_size):
        calls.append([dict(m) for m in prompts[0]])
        return [f"reply {len(calls)}"]

    monkeypatch.setattr(generation, "generate", fake_generate)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nagain\n/reset\nfresh\n/exit\nnever read\n"))
    chat_loop(None, None, system="be brief")
    system = {"role": "system", "content": "be brief"}
    assert calls == [
        [system, {"role": "user", "content": "hello"}],
        [system, {"role": "user", "content": "hello"}, {"role": "assistant", "content": "reply 1"},
         {"role": "user", "content": "again"}],
        [system, {"role": "user", "content": "fresh"}],
    ]
    assert "reply 3" in capsys.readouterr().out
