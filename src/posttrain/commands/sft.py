"""``posttrain sft``: supervised fine-tuning on messages / prompt+completion / text data."""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.commands.base import TrainConfig

HELP = "Supervised fine-tuning on messages / prompt+completion / text data."
EXAMPLES = "posttrain sft examples/sft_lora.yaml\n  posttrain sft data.train=train.jsonl method=qlora lora.r=32 max_steps=200"

@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: imitate assistant/completion tokens."""


Config = SFTConfig


def run(cfg: SFTConfig):
    from posttrain.stages.sft import train

    return train(cfg)
