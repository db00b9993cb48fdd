"""Turn an :class:`SFTExample` into token ids plus a loss mask saying which tokens are targets.

Chat rows are rendered with the tokenizer's own chat template, so training sees exactly the text
that inference will produce. Assistant tokens are found by character span rather than by searching
for token patterns, which works for any template that is prefix-stable: assistant turn i occupies
``[len(render(messages[:i], add_generation_prompt=True)), len(render(messages[:i+1])))`` of the full
rendering. That span ends after the template's end-of-turn marker (``<|im_end|>\\n`` for ChatML),
so the model learns to stop. A token is a target only if its characters lie wholly inside a span.

The mask is not shifted: ``loss_mask[i] == 1`` means token i is a target; the loss does the shift.

Templates that rewrite earlier turns (Qwen3 drops the ``<think>...</think>`` reasoning of every assistant turn
before the last user message) are not prefix-stable: in the whole conversation's rendering an earlier turn
appears without the reasoning it was written with. :func:`tokenize_sft_turns` then makes one example per
trained assistant turn, the conversation up to and including that turn, where the template renders the turn
as the latest one, with its reasoning, after the history as inference will show it. So every turn is
trained on exactly what the model must generate at that point. ``<think>`` content is never removed or
added by posttrain: it is trained on as part of the assistant turn wherever the template renders it.

A chat row whose mask comes out empty (the template renders no assistant text as such) or covers every token
(the template renders nothing but the assistant turns) is an error naming the row, not a silent
all-zeros or all-ones mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import jinja2
from transformers import PreTrainedTokenizerBase

from posttrain.data.formats import SFTExample
from posttrain.errors import PosttrainError

LOSS_ON = ("completion", "all")


class ChatTemplateError(PosttrainError):
    """The chat template rejects this conversation, or rewrites earlier turns so targets cannot be found."""


@dataclass
class TokenizedExample:
    """Token ids of one example and which of them the loss trains on."""

    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is a training target


def tokenize_sft(
    ex: SFTExample, tokenizer: PreTrainedTokenizerBase, loss_on: str = "completion"
) -> TokenizedExample:
    """Tokenize ``ex``; ``loss_on="completion"`` trains on the replies, ``"all"`` on every token.

    Non-chat examples end with EOS so the model learns where a completion stops; chat examples
    already end with the template's end-of-turn token. The prompt (or text) is tokenized with the
    tokenizer's special tokens, so models that expect a BOS (Llama, Gemma) get one.
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on: expected one of {', '.join(LOSS_ON)}, got {loss_on!r}")
    if ex.kind == "chat":
        input_ids, loss_mask = _tokenize_chat(ex, tokenizer, trace_targets=loss_on == "completion")
    else:
        if tokenizer.eos_token_id is None:
            raise PosttrainError("tokenizer has no eos_token; set one so completions can be taught to stop")
        if ex.kind == "prompt_completion":
            prompt_ids = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
            completion_ids = tokenizer(ex.completion, add_special_tokens=False)["input_ids"] + [
                tokenizer.eos_token_id
            ]
            input_ids = prompt_ids + completion_ids
            loss_mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
        else:
            input_ids = tokenizer(ex.text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
            loss_mask = [1] * len(input_ids)
    if loss_on == "all":
        loss_mask = [1] * len(input_ids)
    return TokenizedExample(input_ids=input_ids, loss_mask=loss_mask)


class _NotPrefixStable(ChatTemplateError):
    """The whole conversation's rendering does not extend the rendering of an earlier part of it."""


def tokenize_sft_turns(
    ex: SFTExample, tokenizer: PreTrainedTokenizerBase, loss_on: str = "completion"
) -> list[TokenizedExample]:
    """:func:`tokenize_sft`, except that a conversation whose template rewrites earlier turns becomes one example
    per trained assistant turn (module docstring), instead of an error."""
    try:
        return [tokenize_sft(ex, tokenizer, loss_on)]
    except _NotPrefixStable:
        if ex.kind != "chat" or loss_on != "completion":
            raise
    turns = [i for i in range(ex.first_trained, len(ex.messages)) if ex.messages[i]["role"] == "assistant"]
    return [tokenize_sft(SFTExample("chat", messages=ex.messages[: i + 1], first_trained=i), tokenizer, loss_on)
            for i in turns]


def _tokenize_chat(
    ex: SFTExample, tokenizer: PreTrainedTokenizerBase, *, trace_targets: bool
) -> tuple[list[int], list[int]]:
    if tokenizer.chat_template is None:
        raise PosttrainError(
            "tokenizer has no chat_template, so chat rows cannot be rendered; use a chat model's tokenizer"
        )
    messages = ex.messages
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []  # character [start, end) of each trained assistant turn
    if trace_targets:
        for i in range(ex.first_trained, len(messages)):
            if messages[i]["role"] != "assistant":
                continue
            before = _render(tokenizer, messages[:i], add_generation_prompt=True)
            through = (
                full
                if i == len(messages) - 1
                else _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
            )
            for part, what in (
                (before, f"messages[:{i}] with add_generation_prompt=True"),
                (through, f"messages[:{i + 1}]"),
            ):
                if not full.startswith(part):
                    raise _NotPrefixStable(
                        f"chat template is not prefix-stable: rendering {what} is not a prefix of the whole "
                        f"conversation's rendering, so assistant turn {i} cannot be located (templates that "
                        "rewrite earlier turns, e.g. dropping past reasoning, do this; SFT then trains each "
                        "assistant turn as the last turn of its own example); use loss_on='all' "
                        "or a prefix-stable template"
                    )
            spans.append((len(before), len(through)))

    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = encoding["input_ids"]
    loss_mask = [
        int(any(start <= s and e <= end for start, end in spans)) for s, e in encoding["offset_mapping"]
    ]
    if trace_targets and spans and not any(loss_mask):
        raise ChatTemplateError(
            "no token of the assistant turns is a target: the chat template renders no assistant text in the "
            "spans its own add_generation_prompt marks (check that it writes assistant messages)")
    if trace_targets and all(loss_mask):
        raise ChatTemplateError(
            "every token is a target: the chat template renders nothing but the assistant turns (no prompt, "
            "no role markers), so the model would learn no context; check the template, or use loss_on='all' "
            "if that is intended")
    return input_ids, loss_mask


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, add_generation_prompt: bool
) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except jinja2.TemplateError as e:  # templates reject e.g. non-alternating roles with raise_exception
        raise ChatTemplateError(f"chat template rejected the conversation: {e}") from None
