"""``posttrain kto``: KTO on unpaired prompt/completion/label (thumbs up/down) data."""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.commands.base import TrainConfig
from posttrain.config import opt
from posttrain.errors import ConfigError

HELP = "KTO on unpaired prompt/completion/label (thumbs up/down) data."
EXAMPLES = "posttrain kto examples/kto.yaml\n  posttrain kto data.train=feedback.jsonl undesirable_weight=1.3"

@dataclass
class KTOConfig(TrainConfig):
    """Kahneman-Tversky optimisation on unpaired prompt/completion/label (thumbs up/down) data."""

    output_dir: str = opt("runs/kto", "Where checkpoints, logs and the final model/adapter go.")
    lr: float = opt(5e-5, "Peak learning rate (AdamW): ~5e-5 for LoRA, ~5e-7 for full fine-tuning.")
    batch_size: int = opt(8, "Completions per micro-batch per process.")
    beta: float = opt(0.1, "Strength of the KL anchor to the reference.")
    desirable_weight: float = opt(1.0, "Loss weight of desirable (label true) completions, lambda_D.")
    undesirable_weight: float = opt(1.0, "Loss weight of undesirable (label false) completions, lambda_U. The paper suggests lambda_D n_D / (lambda_U n_U) in [1, 4/3].")
    kl_estimate: bool = opt(True, "Estimate the reference point z0 = KL(policy || reference) from mismatched prompt/completion pairs in each batch (an extra no-gradient forward); false uses z0 = 0.")
    precompute_ref: bool = opt(False, "Compute the reference log-probs once before training and cache them in output_dir.")

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise ConfigError(f"beta: must be > 0, got {self.beta}")
        for key in ("desirable_weight", "undesirable_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")



Config = KTOConfig


def run(cfg: KTOConfig):
    from posttrain.stages.kto import train

    return train(cfg)
