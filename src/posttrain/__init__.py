"""posttrain: post-train large language models (SFT, preference optimisation, RL) from one CLI."""

__version__ = "0.1.0"
