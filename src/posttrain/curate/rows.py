"""A row as curation sees it: its kind (SFT, preference pair, unpaired), the text the model would see and its
responses, validated by the trainers' own normalisers; and the row-level pattern checks the audit and clean share."""

from __future__ import annotations

import re
from dataclasses import dataclass

from posttrain.data.formats import SFTExample, normalize_sft
from posttrain.data.preference import normalize_pair, normalize_unpaired

# Refusal and "As an AI language model" phrases: boilerplate in a response.
BOILERPLATE = re.compile(
    r"as an ai( language model)?|i'?m sorry,? but i (can(no|')t|am unable)|i cannot (help|assist|provide)"
    r"|i am unable to|i don'?t have (personal )?(opinions|feelings)|as a large language model",
    re.IGNORECASE,
)


@dataclass
class Row:
    where: str
    kind: str  # sft | pair | unpaired
    text: str  # everything the model would see, for duplicate/PII/contamination checks
    responses: list[str]
    examples: list[SFTExample]
    key: tuple | None = None  # (prompt, chosen, rejected) for pairs


def content(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return ""


def parse_row(where: str, data: dict) -> Row:
    """The row's kind, validated by the trainers' own functions (``ValueError`` naming the field otherwise)."""
    if "chosen" in data or "rejected" in data:
        chosen, rejected = normalize_pair(data)
        prompt = content(data.get("prompt"))
        c, r = content(data["chosen"]), content(data["rejected"])
        return Row(where, "pair", f"{prompt}\n{c}\n{r}", [c, r], [chosen, rejected], key=(prompt, c, r))
    if "label" in data:
        example, _ = normalize_unpaired(data)
        completion = content(data["completion"])
        return Row(where, "unpaired", f"{content(data['prompt'])}\n{completion}", [completion], [example])
    example = normalize_sft(data)
    if example.kind == "chat":
        responses = [m["content"] for m in example.messages if m["role"] == "assistant"]
        text = "\n".join(m["content"] for m in example.messages)
    elif example.kind == "prompt_completion":
        responses, text = [example.completion], f"{example.prompt}\n{example.completion}"
    else:
        responses, text = [example.text], example.text
    return Row(where, "sft", text, responses, [example])
