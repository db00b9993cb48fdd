"""``posttrain ppo``: online RL with PPO: a value head on the policy, GAE, a KL penalty; typically with a reward model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.commands.base import RLConfig
from posttrain.config import opt
from posttrain.errors import ConfigError

HELP = "Online RL with PPO: a value head on the policy, GAE, a KL penalty; typically with a reward model."
EXAMPLES = "posttrain ppo examples/demo_ppo.yaml data.train=runs/demo/arith/train.jsonl\n  posttrain ppo data.train=prompts.jsonl 'rewards=[{reward_model: runs/rm}]'"

@dataclass
class PPOConfig(RLConfig):
    """PPO with a value head on the policy (classic RLHF): GAE, clipped policy and value losses, KL penalty."""

    output_dir: str = opt("runs/ppo", "Where checkpoints, logs, the report and the final adapter/model (+ value head) go.")
    num_generations: int = opt(1, "Completions sampled per prompt.")
    ppo_epochs: int = opt(4, "Passes over each rollout batch.")
    num_minibatches: int = opt(1, "Optimizer updates per pass (grad_accum must be a multiple of it).")
    gamma: float = opt(1.0, "Discount factor.")
    lam: float = opt(0.95, "GAE lambda.")
    clip_range: float = opt(0.2, "Policy ratio clipping epsilon.")
    value_clip_range: float = opt(0.2, "Value clipping range around the rollout's values.")
    value_coef: float = opt(0.1, "Weight of the value loss.")
    kl_coef: float = opt(0.05, "KL coefficient.")
    kl_in: Literal["reward", "loss"] = opt("reward", "reward: per-token penalty -kl_coef (log pi_old - log pi_ref) added to the reward (InstructGPT); loss: k3 KL term in the loss.")
    whiten_rewards: bool = opt(False, "Whiten the sequence scores across the step before adding the KL penalty.")
    whiten_advantages: bool = opt(True, "Whiten the advantages across the step's tokens.")

    def validate(self) -> None:
        super().validate()
        if self.ppo_epochs < 1 or self.num_minibatches < 1:
            raise ConfigError("ppo_epochs and num_minibatches: must be >= 1")
        if self.grad_accum % self.num_minibatches:
            raise ConfigError(f"num_minibatches: {self.num_minibatches} must divide grad_accum ({self.grad_accum})")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError("gamma and lam: must be in [0, 1]")


Config = PPOConfig


def run(cfg: PPOConfig):
    from posttrain.stages.ppo import train

    return train(cfg)
