"""``posttrain chat``: talk to a model and an optional adapter in the terminal."""

from __future__ import annotations

from posttrain.commands.generate import GenerateConfig

HELP = "Chat interactively with a model and an optional adapter (/reset, /exit)."
EXAMPLES = "posttrain chat adapter=runs/sft"
Config = GenerateConfig


def run(cfg: GenerateConfig) -> None:
    import torch

    from posttrain.generation import chat_loop, sampling_from
    from posttrain.models.adapters import load_model_and_tokenizer

    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.adapter, cfg.trust_remote_code)
    chat_loop(model, tokenizer, sampling_from(cfg.sampling), system=cfg.system)
