"""Prompt datasets for RL: what the policy is asked, plus the columns its rewards check against.

A row is ``prompt`` (a string, used as raw text as in TRL, or a list of chat messages rendered with the chat
template and a generation prompt) or ``messages`` (a conversation: a trailing assistant turn is dropped, and the
rest is the prompt). Every other column (``answer``, ``tests``, ``schema``, ...) is kept as is and handed to the
reward functions as keyword arguments. Rows go through the shared loader (:func:`posttrain.data.dataset.load_rows`),
so a bad row is an error naming file:line (or is skipped and counted), and a prompt longer than
``max_prompt_length`` tokens is dropped and counted (cutting it would cut off the generation prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from posttrain.data.dataset import DataReport, load_rows
from posttrain.data.formats import _check_conversation, _message_list
from posttrain.data.tokenize import TokenizedExample

PROMPT_KEYS = ("prompt", "messages")


@dataclass
class PromptExample:
    prompt: str | list[dict]  # as the reward functions see it
    prompt_ids: list[int]
    row: dict = field(default_factory=dict)  # the other columns


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict]) -> list[int]:
    """Token ids the policy continues: the chat template with a generation prompt for messages, raw text otherwise."""
    if isinstance(prompt, str):
        return tokenizer(prompt).input_ids
    # The chat template writes the special tokens itself, so the tokenizer must not add a BOS again.
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def normalize_prompt(row: dict) -> tuple[str | list[dict], dict]:
    """(prompt, extra columns) of a row; ``ValueError`` naming the field when it has no usable prompt."""
    extra = {k: v for k, v in row.items() if k not in PROMPT_KEYS}
    if row.get("prompt") is not None:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("prompt: empty")
            return prompt, extra
        messages = _message_list(prompt, "prompt")
        if not messages:
            raise ValueError("prompt: empty conversation")
    elif row.get("messages") is not None:
        messages = _message_list(row["messages"], "messages")
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise ValueError("messages: no turn left to answer once the trailing assistant turn is dropped")
    else:
        columns = ", ".join(repr(k) for k in row) or "none"
        raise ValueError(f"missing field: expected 'prompt' (a string or messages) or 'messages' (row has {columns})")
    if messages[-1]["role"] == "assistant":
        raise ValueError("prompt: ends with an assistant turn; the policy answers the last user turn")
    _check_conversation(messages + [{"role": "assistant", "content": "x"}],
                        [f"prompt[{i}]" for i in range(len(messages) + 1)], "prompt")
    return messages, extra


def load_prompt_dataset(path: str | Path, tokenizer: PreTrainedTokenizerBase, *, max_prompt_length: int,
                        skip_invalid: bool = False, **_) -> tuple[list[PromptExample], DataReport]:
    """Every row of ``path`` as a :class:`PromptExample`; prompts over ``max_prompt_length`` tokens are dropped, counted."""

    def convert(data: dict):
        prompt, extra = normalize_prompt(data)
        ids = prompt_token_ids(tokenizer, prompt)
        return [TokenizedExample(ids, [1] * len(ids))], (prompt, extra)

    rows, report = load_rows(path, convert, max_length=max_prompt_length, overflow="drop", skip_invalid=skip_invalid)
    report.prompts_only = True
    return [PromptExample(prompt, seqs[0].input_ids, extra) for seqs, (prompt, extra) in rows], report


def prompts_from_file(path: str) -> list[list[dict]]:
    """Conversations to answer from a data file: the rows' prompts, without their reference answers."""
    from posttrain.data.formats import normalize_sft
    from posttrain.data.io import read_records
    from posttrain.errors import DataError

    prompts = []
    for rec in read_records(path):
        if rec.error:
            raise DataError(rec.where, rec.error)
        try:
            prompts.append(normalize_sft(rec.data).prompt_messages())
        except ValueError as e:
            raise DataError(rec.where, str(e)) from e
    return prompts


def prompt_rows(path: str | Path) -> list[tuple[str | list[dict], dict]]:
    """Every row of a prompt file as (prompt, other columns), untokenized; the first invalid row raises
    :class:`~posttrain.errors.DataError` naming its file and line (held-out sets are small and must be whole)."""
    from posttrain.data.io import read_records
    from posttrain.errors import DataError

    out = []
    for rec in read_records(str(path)):
        if rec.error:
            raise DataError(rec.where, rec.error)
        try:
            out.append(normalize_prompt(rec.data))
        except ValueError as e:
            raise DataError(rec.where, str(e)) from None
    if not out:
        raise DataError(str(path), "no prompts")
    return out
