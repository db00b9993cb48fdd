"""posttrain: post-train large language models (SFT, preference optimisation, RL) from one CLI."""

__version__ = "0.1.0"

# Import order: config registers every command's config, including plan's, which imports config's helpers.
from posttrain import config as _config  # noqa: E402,F401
