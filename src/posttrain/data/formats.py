"""Validate one raw SFT row in a conventional TRL format and normalise it to an :class:`SFTExample`.

Accepted formats (the first one present wins, so a dataset such as ultrachat that carries both a
``prompt`` string and the full ``messages`` trains on ``messages``; extra columns are ignored, and a
column whose value is null counts as absent, because Parquet and Arrow fill missing keys with null):

1. ``messages``: ``[{"role", "content"}, ...]``, the whole conversation. Every assistant turn is trained.
2. ``prompt`` + ``completion``: two strings (plain text, no chat template), or two message lists
   (conversational: rendered as one conversation, only the completion's assistant turns trained).
3. ``text``: one string, trained on in full.

Errors are ``ValueError(reason)`` whose reason starts with the offending field
(``messages[2].role: ...``); the caller prefixes the row's location.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ROLES = ("system", "user", "assistant")


@dataclass
class SFTExample:
    """One validated row, in one shape whatever format it came in.

    Which fields are meaningful depends on ``kind``:
    - ``"chat"``: ``messages``; assistant turns at index ``>= first_trained`` are training targets
      (0 for a ``messages`` row; the prompt's length for a conversational prompt/completion row,
      whose prompt may hold earlier assistant turns that are context, not targets).
    - ``"prompt_completion"``: ``prompt`` and ``completion``, plain strings.
    - ``"text"``: ``text``.
    """

    kind: Literal["chat", "prompt_completion", "text"]
    messages: list[dict[str, str]] = field(default_factory=list)
    first_trained: int = 0
    prompt: str = ""
    completion: str = ""
    text: str = ""

    def prompt_messages(self) -> list[dict[str, str]]:
        """The conversation up to the reply a model is asked for, e.g. to generate answers for evaluation.

        A ``messages`` row is cut before its last assistant turn, a conversational prompt/completion
        row before its completion; a plain prompt becomes one user turn. ``text`` rows have no prompt.
        """
        if self.kind == "chat":
            if self.first_trained > 0:
                return [dict(m) for m in self.messages[: self.first_trained]]
            last_reply = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
            return [dict(m) for m in self.messages[:last_reply]]
        if self.kind == "prompt_completion":
            return [{"role": "user", "content": self.prompt}]
        raise ValueError(
            "text: a 'text' row has no prompt to answer; use 'messages' or 'prompt'+'completion' rows"
        )


def normalize_sft(row: dict) -> SFTExample:
    """Validate ``row`` and return it normalised; raise ``ValueError`` naming the bad field."""
    if row.get("messages") is not None:
        messages = _message_list(row["messages"], "messages")
        _check_conversation(messages, [f"messages[{i}]" for i in range(len(messages))], "messages")
        return SFTExample("chat", messages=messages)

    prompt, completion = row.get("prompt"), row.get("completion")
    if prompt is not None or completion is not None:
        if prompt is None:
            raise ValueError("missing field: 'completion' needs a 'prompt' (use \"\" for none)")
        if completion is None:
            raise ValueError("missing field: 'prompt' needs a 'completion'")
        return normalize_prompt_completion(prompt, completion)

    text = row.get("text")
    if text is not None:
        if not isinstance(text, str):
            raise ValueError(f"text: expected a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("text: empty")
        return SFTExample("text", text=text)

    columns = ", ".join(repr(k) for k in row) or "none"
    raise ValueError(
        f"missing field: expected 'messages', 'prompt'+'completion', or 'text' (row has {columns})"
    )


def normalize_prompt_completion(prompt: object, completion: object, name: str = "completion") -> SFTExample:
    """A prompt and one reply to it: two strings, or two message lists. ``name`` is the reply's field
    (``completion``, or ``chosen``/``rejected`` in preference data), used in error messages."""
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise ValueError(f"{name}: empty")
        return SFTExample("prompt_completion", prompt=prompt, completion=completion)
    if isinstance(prompt, list) and isinstance(completion, list):
        return _conversational_prompt_completion(prompt, completion, name)
    raise ValueError(
        f"prompt/{name}: expected both strings or both message lists, "
        f"got {type(prompt).__name__} and {type(completion).__name__}"
    )


def _conversational_prompt_completion(prompt: list, completion: list, name: str = "completion") -> SFTExample:
    prompt_msgs = _message_list(prompt, "prompt")
    completion_msgs = _message_list(completion, name)
    if not prompt_msgs:
        raise ValueError(f"prompt: empty conversation; a {name} needs a turn to answer")
    if not completion_msgs:
        raise ValueError(f"{name}: no assistant turn")
    for i, message in enumerate(completion_msgs):
        if message["role"] != "assistant":
            raise ValueError(
                f"{name}[{i}].role: expected 'assistant' (the {name} is the model's reply), got {message['role']!r}"
            )
    labels = [f"prompt[{i}]" for i in range(len(prompt_msgs))] + [
        f"{name}[{i}]" for i in range(len(completion_msgs))
    ]
    messages = prompt_msgs + completion_msgs
    _check_conversation(messages, labels, name)
    return SFTExample("chat", messages=messages, first_trained=len(prompt_msgs))


def _message_list(value: object, name: str) -> list[dict[str, str]]:
    """Check each message's shape; return copies holding only role and content.

    Dropping other keys matters: Arrow gives every message the union of keys across the dataset,
    filled with null, and templates branch on keys such as ``tool_calls`` being present.
    """
    if not isinstance(value, list):
        raise ValueError(f"{name}: expected a list of {{role, content}} messages, got {type(value).__name__}")
    messages = []
    for i, message in enumerate(value):
        label = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise ValueError(
                f"{label}: expected an object with 'role' and 'content', got {type(message).__name__}"
            )
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"{label}: missing '{key}'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"{label}.role: unknown role {role!r} (expected {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f"{label}.content: expected a string, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    return messages


def _check_conversation(messages: list[dict[str, str]], labels: list[str], name: str) -> None:
    """Rules on the conversation as a whole; ``labels[i]`` names message i in the user's row."""
    if not messages:
        raise ValueError(f"{name}: no assistant turn")
    # Transformers cannot render an empty conversation, so an opening assistant turn has no
    # rendered prompt to measure where it starts; it would also be a reply to nothing.
    if messages[0]["role"] == "assistant":
        raise ValueError(
            f"{labels[0]}.role: conversation starts with an assistant turn; add the user turn it answers"
        )
    for i, message in enumerate(messages):
        if message["role"] == "system" and i > 0:
            raise ValueError(f"{labels[i]}.role: a system turn is only allowed first")
        if message["role"] == "assistant" and not message["content"].strip():
            raise ValueError(f"{labels[i]}.content: empty assistant turn")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{name}: no assistant turn")
