"""``posttrain dpo``: preference optimisation on prompt/chosen/rejected pairs: DPO, robust DPO, IPO, hinge, SimPO."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.commands.base import TrainConfig
from posttrain.config import opt
from posttrain.errors import ConfigError

HELP = "Preference optimisation on prompt/chosen/rejected pairs: DPO, robust DPO, IPO, hinge, SimPO."
EXAMPLES = "posttrain dpo examples/dpo.yaml\n  posttrain dpo data.train=prefs.jsonl adapter=runs/sft loss=ipo beta=0.5"

@dataclass
class DPOConfig(TrainConfig):
    """Direct preference optimisation and its family on prompt/chosen/rejected pairs."""

    output_dir: str = opt("runs/dpo", "Where checkpoints, logs and the final model/adapter go.")
    lr: float = opt(5e-5, "Peak learning rate (AdamW). Preference stages want less than SFT: ~5e-5 for LoRA, ~5e-7 for full fine-tuning.")
    batch_size: int = opt(8, "Preference pairs per micro-batch per process (chosen and rejected run in one forward pass).")
    loss: Literal["sigmoid", "robust", "ipo", "hinge", "simpo"] = opt("sigmoid", "sigmoid (DPO), robust (rDPO), ipo, hinge (SLiC), or simpo (reference-free, length-normalised).")
    beta: float = opt(0.1, "Strength of the KL anchor to the reference (DPO's beta); SimPO's reward scale (its paper uses 2-2.5).")
    label_smoothing: float = opt(0.0, "Assumed rate of flipped preference labels, in [0, 0.5): conservative DPO (sigmoid) or robust DPO (robust).")
    simpo_gamma: float = opt(0.5, "SimPO's target reward margin gamma.")
    rpo_alpha: float = opt(0.0, "Add rpo_alpha x the chosen response's mean NLL per token to each pair's loss (RPO / DPO+NLL, Pang et al. 2024; TRL's rpo_alpha): keeps the chosen answers likely while the margin grows. 0 = off; ~1 is the paper's.")
    precompute_ref: bool = opt(False, "Compute the reference log-probs once before training (with the initial model) and cache them in output_dir: one forward pass per step instead of two, and no reference copy in memory.")

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise ConfigError(f"beta: must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.rpo_alpha < 0:
            raise ConfigError(f"rpo_alpha: must be >= 0, got {self.rpo_alpha}")
        if self.label_smoothing and self.loss not in ("sigmoid", "robust"):
            raise ConfigError(f"label_smoothing: only used by loss sigmoid or robust, not {self.loss}")



Config = DPOConfig


def run(cfg: DPOConfig):
    from posttrain.stages.dpo import train

    return train(cfg)
