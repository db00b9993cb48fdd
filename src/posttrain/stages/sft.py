"""Supervised fine-tuning: maximise the likelihood of assistant/completion tokens.

Departures from a textbook SFT loop:
1. The loss is summed over target tokens and divided by the target tokens of the whole optimizer step
   (all micro-batches and processes), not averaged per micro-batch: a micro-batch with many short
   answers does not get more weight per token than one with a few long ones.
2. By default only assistant turns (chat data) or completions (prompt/completion data) are targets,
   including the end-of-turn token, so the model learns to stop.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from posttrain.data.batching import collate_packed, collate_sft, pack_examples, packing_efficiency
from posttrain.data.dataset import load_sft_dataset
from posttrain.engine.setup import (
    TrainResult,
    build,
    load_tokenizer_for,
    load_train_eval,
    make_accelerator,
    parallel,
    save_final,
    say,
)
from posttrain.engine.trainer import Engine
from posttrain.losses import count_loss_tokens, sft_loss
from posttrain.methods import can_pack
from posttrain.models.forward import target_logps

if TYPE_CHECKING:
    from posttrain.commands.sft import SFTConfig


class SFTObjective:
    """Next-token cross-entropy on the target tokens of a padded or packed batch."""

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return count_loss_tokens(batch["labels"])

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        logps, _ = target_logps(model, batch, self.chunk_size)  # (N,)
        return sft_loss(logps)



def train(cfg: SFTConfig) -> TrainResult:
    accelerator = make_accelerator(cfg)
    tokenizer = load_tokenizer_for(cfg)
    loader = functools.partial(load_sft_dataset, loss_on=cfg.data.loss_on)
    train_rows, eval_rows = load_train_eval(cfg, tokenizer, accelerator, loader)

    pad_id = tokenizer.pad_token_id
    if cfg.packing and can_pack(cfg.method):
        n_rows = len(train_rows)
        train_rows = pack_examples(train_rows, cfg.max_length)
        eval_rows = pack_examples(eval_rows, cfg.max_length) if eval_rows else eval_rows
        say(accelerator, f"packing: {n_rows} examples into {len(train_rows)} rows of <= {cfg.max_length} tokens "
                         f"({packing_efficiency(train_rows, cfg.max_length):.0%} of the token budget used)")

        def collate(packs):
            return collate_packed(packs, pad_id)
    else:
        if cfg.packing:
            say(accelerator, f"packing: off for method {cfg.method} (its virtual tokens would be shared across packed examples)")

        def collate(rows):
            return collate_sft(rows, pad_id)

    setup = build(cfg, tokenizer, accelerator)
    engine = Engine(cfg, setup.model, train_rows, collate, eval_rows, accelerator)
    say(accelerator, f"training {engine.total_steps} steps of {engine.global_batch} sequences "
                     f"({parallel(cfg, accelerator)})")
    fit = engine.fit(SFTObjective(cfg.loss_chunk_size))
    out = save_final(engine.model, tokenizer, cfg.output_dir, accelerator)
    summary = f"done: {fit.steps} steps, final train loss {fit.final_train_loss:.4f}"
    if fit.eval_metrics:
        summary += f", eval loss {fit.eval_metrics['loss']:.4f} (perplexity {fit.eval_metrics['perplexity']:.2f})"
    say(accelerator, f"{summary}; saved to {out}")
    return TrainResult(output_dir=out, fit=fit, model=engine.model)
