"""Direct preference optimisation (and IPO, hinge/SLiC, robust DPO, SimPO) on prompt/chosen/rejected pairs.

Composed from shared parts: the engine (units = pairs, so every step's loss is the mean over the step's pairs
whatever the accumulation or process count), the SFT forward path (chosen and rejected of a micro-batch go
through ONE forward pass, packed without attention across sequences when the method allows), the pure losses
in :mod:`posttrain.losses`, and the reference strategies in :mod:`posttrain.models.reference`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from posttrain.data.preference import PairExample, collate_pairs, load_pair_dataset
from posttrain.engine.setup import (
    TrainResult,
    attach_reference_logps,
    build,
    finish,
    load_tokenizer_for,
    load_train_eval,
    make_accelerator,
    pack_capacity,
    parallel,
    reference_for,
    say,
)
from posttrain.engine.trainer import Engine
from posttrain.losses import dpo_loss
from posttrain.models.forward import sequence_logps
from posttrain.models.reference import Reference, drop_reference_adapter

if TYPE_CHECKING:
    from posttrain.commands.dpo import DPOConfig


class DPOObjective:
    """The DPO family's loss on a batch of pairs (sequences 0..B-1 chosen, B..2B-1 rejected)."""

    unit = "pairs"
    perplexity = False
    progress_keys = ("rewards/accuracy", "rewards/margins")

    def __init__(self, cfg: DPOConfig, reference: Reference):
        self.cfg, self.reference = cfg, reference

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["last_index"].shape[0] // 2

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        cfg = self.cfg
        logps, tokens = sequence_logps(model, batch, cfg.loss_chunk_size)  # (2B,), (2B,)
        b = logps.shape[0] // 2
        if cfg.loss == "simpo":
            ref = None
        elif "ref_logps" in batch:
            ref = batch["ref_logps"].to(logps.dtype)
        else:
            ref = self.reference(model, batch, lambda m, bt: sequence_logps(m, bt, cfg.loss_chunk_size)[0]).to(logps.dtype)
        return dpo_loss(
            logps[:b], logps[b:], None if ref is None else ref[:b], None if ref is None else ref[b:],
            beta=cfg.beta, loss_type=cfg.loss, label_smoothing=cfg.label_smoothing,
            chosen_tokens=tokens[:b], rejected_tokens=tokens[b:], simpo_gamma=cfg.simpo_gamma, rpo_alpha=cfg.rpo_alpha,
        )




def pair_sequences(pairs: list[PairExample]) -> list:
    """Every chosen sequence, then every rejected one (the order of a pair batch)."""
    return [p.chosen for p in pairs] + [p.rejected for p in pairs]


def store_pair_logps(pairs: list[PairExample], values) -> None:
    n = len(pairs)
    for i, pair in enumerate(pairs):
        pair.ref_chosen, pair.ref_rejected = float(values[i]), float(values[n + i])


def train(cfg: DPOConfig) -> TrainResult:
    accelerator = make_accelerator(cfg)
    tokenizer = load_tokenizer_for(cfg)
    train_pairs, eval_pairs = load_train_eval(cfg, tokenizer, accelerator, load_pair_dataset)
    capacity = pack_capacity(cfg, accelerator)
    pad_id = tokenizer.pad_token_id

    setup = build(cfg, tokenizer, accelerator)
    model = setup.model
    reference = reference_for(cfg, model, accelerator, needed=cfg.loss != "simpo")
    attach_reference_logps(cfg, model, accelerator, reference, {"train": train_pairs, "eval": eval_pairs},
                           pad_id=pad_id, capacity=capacity, sequences=pair_sequences, store=store_pair_logps)

    def collate(pairs: list[PairExample]):
        return collate_pairs(pairs, pad_id, capacity)

    engine = Engine(cfg, model, train_pairs, collate, eval_pairs, accelerator)
    say(accelerator, f"training {engine.total_steps} steps of {engine.global_batch} pairs, loss {cfg.loss}, beta {cfg.beta} "
                     f"({parallel(cfg, accelerator)})")
    fit = engine.fit(DPOObjective(cfg, reference))
    drop_reference_adapter(engine.model)
    out = finish(engine, fit, tokenizer, cfg, accelerator, "adapter" if cfg.method != "full" else "model")
    return TrainResult(output_dir=out, fit=fit, model=engine.model)
