"""Assistant-only loss under the chat-template styles users meet, with templates written here in each style:
ChatML (Qwen), header tokens (Llama 3), turn markers that fold the system prompt into the first user turn
(Gemma), and reasoning templates that keep or strip ``<think>`` blocks of earlier turns (Qwen3)."""

from __future__ import annotations

import copy
import json

import pytest

from posttrain.data.dataset import load_sft_dataset
from posttrain.data.formats import normalize_sft
from posttrain.data.tokenize import ChatTemplateError, tokenize_sft, tokenize_sft_turns
from posttrain.errors import DataError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0].role == 'system' %}{% set system = messages[0].content + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}<start_of_turn>{{ 'model' if m.role == 'assistant' else 'user' }}\n"
    "{{ (system if loop.first else '') + (m.content | trim) }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# Qwen3's rule: an assistant turn before the last user message loses its <think> block.
QWEN3_STRIP = (
    "{% set ns = namespace(last_user=-1) %}{% for m in messages %}{% if m.role == 'user' %}"
    "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% set content = m.content %}"
    "{% if m.role == 'assistant' and loop.index0 < ns.last_user and '</think>' in content %}"
    "{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

FIRST = "<think>\nThe capital of France is Paris.\n</think>\n\nParis."
SECOND = "<think>\nRome is Italy's capital.\n</think>\n\nRome."
CONVERSATION = [{"role": "system", "content": "Answer with one word."},
                {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": FIRST},
                {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": SECOND}]


def _with_template(tokenizer, template: str, specials: list[str]):
    styled = copy.deepcopy(tokenizer)
    styled.add_special_tokens({"additional_special_tokens": specials})
    styled.chat_template = template
    return styled


def _targets(tokenizer, example) -> str:
    """The text of the trained tokens, in order."""
    return tokenizer.decode([t for t, m in zip(example.input_ids, example.loss_mask) if m])


STYLES = {  # style -> (template, its special tokens, the trained text of CONVERSATION)
    "chatml": (CHATML, [], f"{FIRST}<|im_end|>\n{SECOND}<|im_end|>\n"),
    "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               f"{FIRST}<|eot_id|>{SECOND}<|eot_id|>"),
    "gemma": (GEMMA, ["<start_of_turn>", "<end_of_turn>"], f"{FIRST}<end_of_turn>\n{SECOND}<end_of_turn>\n"),
}


@pytest.mark.parametrize("style", list(STYLES))
def test_assistant_only_mask_in_each_template_style(style, tokenizer):
    """Exactly the replies and each reply's end-of-turn marker are trained: no system prompt (folded into the
    first user turn for Gemma), user text, role header or generation prompt."""
    template, specials, trained = STYLES[style]
    styled = _with_template(tokenizer, template, specials)
    (example,) = tokenize_sft_turns(normalize_sft({"messages": CONVERSATION}), styled)
    assert _targets(styled, example) == trained
    rendered = styled.decode(example.input_ids)
    assert "Answer with one word." in rendered and "<think>" in rendered  # kept, reasoning trained as given


def test_reasoning_template_that_strips_earlier_thinking_trains_each_turn_as_the_last(tokenizer):
    """Qwen3-style: the whole rendering shows the first reply without its reasoning, which is not what the model
    wrote at that turn. One example per reply instead: the history as inference shows it, the reply whole."""
    styled = _with_template(tokenizer, QWEN3_STRIP, [])
    ex = normalize_sft({"messages": CONVERSATION})
    with pytest.raises(ChatTemplateError, match="not prefix-stable"):
        tokenize_sft(ex, styled)
    first, second = tokenize_sft_turns(ex, styled)
    assert _targets(styled, first) == f"{FIRST}<|im_end|>\n"
    assert _targets(styled, second) == f"{SECOND}<|im_end|>\n"
    history = styled.decode(second.input_ids)
    assert "The capital of France is Paris." not in history  # the earlier turn's reasoning, stripped as at inference
    assert history.startswith(styled.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True))


def test_split_conversations_are_counted_in_the_data_report(tokenizer, tmp_path):
    styled = _with_template(tokenizer, QWEN3_STRIP, [])
    data = tmp_path / "think.jsonl"
    one_turn = CONVERSATION[:3]
    data.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps({"messages": one_turn}) + "\n")
    examples, report = load_sft_dataset(data, styled, max_length=512)
    assert len(examples) == 3 and report.rows_kept == 2 and report.examples_from_turns == 2
    assert "2 examples come from conversations split per assistant turn" in report.summary()


@pytest.mark.parametrize("template,message", [
    ("{% for m in messages %}{% if m.role != 'assistant' %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
     "{% endif %}{% endfor %}", "no token of the assistant turns is a target"),
    ("{% for m in messages %}{% if m.role == 'assistant' %}{{ m.content }}{% endif %}{% endfor %}",
     "every token is a target"),
])
def test_an_empty_or_all_covering_mask_is_an_error_naming_the_row(template, message, tokenizer, tmp_path):
    styled = _with_template(tokenizer, template, [])
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATION[1:3]}) + "\n")
    with pytest.raises(DataError, match=rf"rows.jsonl:1: {message}"):
        load_sft_dataset(data, styled, max_length=512)
