"""``posttrain eval``: eval loss and perplexity on a dataset, plus sample generations."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from posttrain.commands.base import SamplingSection
from posttrain.config import opt, section
from posttrain.errors import ConfigError

HELP = "Eval loss and perplexity on a dataset, plus sample generations."
EXAMPLES = "posttrain eval adapter=runs/sft data=heldout.jsonl"


@dataclass
class EvalConfig:
    model: str = opt("smollm2-135m", "Base model.")
    adapter: str | None = opt(None, "A PEFT adapter directory to apply.")
    trust_remote_code: bool = opt(False, "Allow model repositories to run their own Python code.")
    data: str | None = opt(None, "Dataset for loss/perplexity (any SFT format) (required).")
    max_length: int = opt(1024, "Maximum tokens per sequence.")
    batch_size: int = opt(8, "Sequences per batch.")
    loss_on: Literal["completion", "all"] = opt("completion", "Tokens that count towards the loss.")
    skip_invalid: bool = opt(False, "Skip invalid rows instead of stopping.")
    num_samples: int = opt(3, "Also generate answers for this many prompts of the dataset.")
    sampling: SamplingSection = section(SamplingSection, "Sampling settings for the sample generations.")


Config = EvalConfig


def run(cfg: EvalConfig) -> dict:
    import torch

    from posttrain.data.batching import collate_sft
    from posttrain.data.dataset import load_sft_dataset
    from posttrain.data.prompts import prompts_from_file
    from posttrain.generation import generate, sampling_from
    from posttrain.models.adapters import load_model_and_tokenizer
    from posttrain.models.forward import target_logps
    from posttrain.models.loading import load_tokenizer

    if not cfg.data:
        raise ConfigError("data: required (a dataset to compute loss and perplexity on)")
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    rows, report = load_sft_dataset(cfg.data, tokenizer, max_length=cfg.max_length, skip_invalid=cfg.skip_invalid, loss_on=cfg.loss_on)
    print(report.summary())
    model, _ = load_model_and_tokenizer(cfg.model, cfg.adapter, cfg.trust_remote_code)
    total, tokens = 0.0, 0
    from tqdm.auto import tqdm

    with torch.inference_mode():
        for start in tqdm(range(0, len(rows), cfg.batch_size), desc="eval", disable=len(rows) <= cfg.batch_size):
            batch = collate_sft(rows[start : start + cfg.batch_size], tokenizer.pad_token_id)
            logps, _ = target_logps(model, batch)
            total -= float(logps.sum())
            tokens += logps.numel()
    loss = total / max(tokens, 1)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens, "rows": len(rows)}
    print(f"eval loss {loss:.4f}  perplexity {result['perplexity']:.2f}  over {tokens} target tokens in {len(rows)} rows")
    if cfg.num_samples > 0:
        convs = prompts_from_file(cfg.data)[: cfg.num_samples]
        outs = generate(model, tokenizer, convs, sampling_from(cfg.sampling), batch_size=cfg.batch_size)
        for conv, out in zip(convs, outs):
            print(f"\n>>> {conv[-1]['content']}\n{out}")
        result["samples"] = outs
    return result
