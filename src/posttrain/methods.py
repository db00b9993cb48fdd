"""The ways a model's parameters are updated, and what each allows: one torch-free definition that the config,
the planner, the batching and the trainer share."""

from __future__ import annotations

METHODS = ("full", "lora", "qlora", "prompt", "prefix")
# Methods that train a PEFT adapter on a frozen base (the rest, full, trains the model itself).
ADAPTER_METHODS = ("lora", "qlora", "prompt", "prefix")
# Methods whose adapters act per token, so packed examples stay independent. Prompt and prefix tuning add
# virtual positions per row, which packed examples would share.
PACKING_METHODS = ("full", "lora", "qlora")


def can_pack(method: str) -> bool:
    """Whether several examples may share a row under ``method``."""
    return method in PACKING_METHODS
