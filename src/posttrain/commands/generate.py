"""``posttrain generate``: answer prompts with a model and an optional adapter."""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.commands.base import SamplingSection
from posttrain.config import opt, section
from posttrain.errors import ConfigError

HELP = "Generate answers for prompts with a model and an optional adapter."
EXAMPLES = "posttrain generate adapter=runs/sft prompt='[\"Name three colours.\"]'"


@dataclass
class GenerateConfig:
    model: str = opt("smollm2-135m", "Base model: 'smollm2-135m', a local HF directory, or a hub id.")
    adapter: str | None = opt(None, "A PEFT adapter directory to apply.")
    trust_remote_code: bool = opt(False, "Allow model repositories to run their own Python code.")
    prompt: list[str] = opt([], "User prompts (each becomes one chat conversation).")
    prompts_file: str | None = opt(None, "A data file of prompts: `messages` (the last assistant turn is dropped), `prompt`, or `text` rows.")
    system: str | None = opt(None, "System message prepended to every prompt.")
    batch_size: int = opt(8, "Prompts generated together.")
    seed: int = opt(42, "Sampling seed.")
    sampling: SamplingSection = section(SamplingSection, "Sampling settings.")


Config = GenerateConfig


def run(cfg: GenerateConfig) -> list[str]:
    import torch

    from posttrain.data.prompts import prompts_from_file
    from posttrain.generation import generate, sampling_from
    from posttrain.models.adapters import load_model_and_tokenizer

    prompts: list[list[dict]] = [[{"role": "user", "content": p}] for p in cfg.prompt]
    if cfg.prompts_file:
        prompts += prompts_from_file(cfg.prompts_file)
    if not prompts:
        raise ConfigError("prompt: give at least one prompt (prompt='[\"...\"]') or a prompts_file")
    if cfg.system:
        prompts = [[{"role": "system", "content": cfg.system}] + [m for m in p if m["role"] != "system"] for p in prompts]
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.adapter, cfg.trust_remote_code)
    outputs = generate(model, tokenizer, prompts, sampling_from(cfg.sampling), batch_size=cfg.batch_size, progress=len(prompts) > cfg.batch_size)
    for conv, out in zip(prompts, outputs):
        print(f">>> {conv[-1]['content']}\n{out}\n")
    return outputs
