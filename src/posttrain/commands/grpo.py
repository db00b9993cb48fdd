"""``posttrain grpo``: online RL with GRPO/RLOO: sample groups of completions per prompt, reward them, guard against reward hacking."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.commands.base import RLConfig
from posttrain.config import opt
from posttrain.errors import ConfigError

HELP = "Online RL with GRPO/RLOO: sample groups of completions per prompt, reward them, guard against reward hacking."
EXAMPLES = "posttrain grpo examples/demo_grpo.yaml data.train=runs/demo/arith/train.jsonl\n  posttrain grpo data.train=prompts.jsonl 'rewards=[{function: numeric_match}]' num_generations=8"

@dataclass
class GRPOConfig(RLConfig):
    """Group relative policy optimisation (and RLOO): group-normalised rewards, clipped ratio, k3 KL."""

    output_dir: str = opt("runs/grpo", "Where checkpoints, logs, the report and the final adapter/model go.")
    advantage: Literal["grpo", "rloo"] = opt("grpo", "grpo: (r - group mean) [/ group std]; rloo: r - mean of the other samples of the prompt.")
    scale_rewards: bool = opt(True, "GRPO: divide by the group's standard deviation (false: Dr. GRPO, Liu et al. 2025).")
    loss_norm: Literal["token", "sequence"] = opt("token", "token: every completion token weighs the same (DAPO); sequence: each completion's token mean, averaged (the GRPO paper).")
    beta: float = opt(0.04, "Coefficient of the k3 KL to the reference in the loss (0: no KL term; see measure_kl).")
    measure_kl: Literal["auto", "always"] = opt("auto", "Whether the KL to the reference (`kl`, from one no-gradient reference forward per micro-batch) is measured when beta is 0, where the loss does not need it: auto = only if a guard rule watches kl or kl/trend (otherwise the pass is skipped, as TRL does at beta 0, and a full fine-tune keeps no frozen copy); always = measured and logged anyway. With beta > 0 it is always measured.")
    clip_low: float = opt(0.2, "Ratio clipping below 1 (epsilon).")
    clip_high: float = opt(0.2, "Ratio clipping above 1 (DAPO's clip-higher uses 0.28).")
    num_iterations: int = opt(1, "Optimizer updates per rollout batch (GRPO's mu); >1 reuses rollouts, ratios then leave 1.")

    def validate(self) -> None:
        super().validate()
        if self.advantage == "rloo" and self.num_generations < 2:
            raise ConfigError("advantage rloo: needs num_generations >= 2")
        if self.advantage == "grpo" and self.num_generations < 2:
            raise ConfigError("num_generations: GRPO compares completions of a prompt, so it needs >= 2")
        if self.num_iterations < 1:
            raise ConfigError(f"num_iterations: must be >= 1, got {self.num_iterations}")



Config = GRPOConfig


def run(cfg: GRPOConfig):
    from posttrain.stages.grpo import train

    return train(cfg)
