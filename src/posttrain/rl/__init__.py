"""Reinforcement learning from rewards (GRPO/PPO): rollouts, reward-hacking guards and the run report."""
