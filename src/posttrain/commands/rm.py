"""``posttrain rm``: train a Bradley-Terry reward model on prompt/chosen/rejected pairs."""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.commands.base import TrainConfig
from posttrain.config import opt

HELP = "Train a Bradley-Terry reward model on prompt/chosen/rejected pairs."
EXAMPLES = "posttrain rm examples/rm.yaml\n  posttrain rm data.train=prefs.jsonl method=lora max_steps=200"

@dataclass
class RMConfig(TrainConfig):
    """A Bradley-Terry reward model: a scalar head on the base LM, trained on prompt/chosen/rejected pairs."""

    output_dir: str = opt("runs/rm", "Where checkpoints, logs and the reward model (or its adapter) go.")
    lr: float = opt(1e-4, "Peak learning rate (AdamW).")
    batch_size: int = opt(8, "Preference pairs per micro-batch per process.")
    center_rewards: float = opt(0.0, "Coefficient of (r_chosen + r_rejected)^2, which keeps rewards centred on 0 (Eisenstein et al. 2023); 0.01 is typical.")


Config = RMConfig


def run(cfg: RMConfig):
    from posttrain.stages.rm import train

    return train(cfg)
