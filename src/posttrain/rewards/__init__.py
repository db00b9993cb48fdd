"""Reward sources: trained reward models (and, with the RL stages, verifiers and judges)."""
