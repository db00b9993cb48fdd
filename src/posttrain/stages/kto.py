"""Kahneman-Tversky optimisation on unpaired feedback: prompt/completion/label (thumbs up or down).

Same parts as DPO (:mod:`posttrain.stages.dpo`): the engine with units = completions, the shared forward
path, :func:`posttrain.losses.kto_loss`, and the reference strategies. The reference point z0 (the paper's
KL(policy || reference)) is estimated per micro-batch on mismatched pairs (row i's prompt with row i+1's
completion), in a separate no-gradient forward, as in Ethayarajh et al. 2024 sec. 4.1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from posttrain.data.preference import UnpairedExample, collate_sequences, load_unpaired_dataset
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
from posttrain.losses import kto_loss, kto_reference_point
from posttrain.models.forward import sequence_logps
from posttrain.models.reference import Reference, drop_reference_adapter

if TYPE_CHECKING:
    from posttrain.commands.kto import KTOConfig

KL_PREFIX = "kl_"


def collate_kto(examples: list[UnpairedExample], pad_id: int, capacity: int | None, with_kl: bool) -> dict[str, torch.Tensor]:
    """The completions' batch, plus (keys prefixed ``kl_``) a second batch of their mismatched pairs."""
    batch = collate_sequences([e.sequence for e in examples], pad_id, capacity)
    batch["desirable"] = torch.tensor([e.desirable for e in examples], dtype=torch.bool)
    if examples[0].ref is not None:
        batch["ref_logps"] = torch.tensor([e.ref for e in examples], dtype=torch.float64)
    if with_kl:
        kl = collate_sequences([e.kl_sequence for e in examples], pad_id, capacity)
        if examples[0].ref_kl is not None:
            kl["ref_logps"] = torch.tensor([e.ref_kl for e in examples], dtype=torch.float64)
        batch.update({KL_PREFIX + k: v for k, v in kl.items()})
    return batch


def _split(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    main = {k: v for k, v in batch.items() if not k.startswith(KL_PREFIX)}
    kl = {k[len(KL_PREFIX):]: v for k, v in batch.items() if k.startswith(KL_PREFIX)}
    return main, (kl or None)


class KTOObjective:
    unit = "ex"
    perplexity = False
    progress_keys = ("kl",)

    def __init__(self, cfg: KTOConfig, reference: Reference):
        self.cfg, self.reference = cfg, reference

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["desirable"].shape[0])

    def _ref(self, model, batch) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        return self.reference(model, batch, lambda m, bt: sequence_logps(m, bt, self.cfg.loss_chunk_size)[0])

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        cfg = self.cfg
        main, kl_batch = _split(batch)
        logps, _ = sequence_logps(model, main, cfg.loss_chunk_size)  # (B,)
        ref = self._ref(model, main).to(logps.dtype)
        if kl_batch is not None:
            with torch.no_grad():
                kl_logps, _ = sequence_logps(model, kl_batch, cfg.loss_chunk_size)
            z0 = kto_reference_point(kl_logps, self._ref(model, kl_batch).to(kl_logps.dtype))
        else:
            z0 = logps.new_zeros(())
        return kto_loss(logps, ref, main["desirable"], z0, beta=cfg.beta,
                        desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)




def train(cfg: KTOConfig) -> TrainResult:
    accelerator = make_accelerator(cfg)
    tokenizer = load_tokenizer_for(cfg)
    train_rows, eval_rows = load_train_eval(cfg, tokenizer, accelerator, load_unpaired_dataset)
    n_good = sum(e.desirable for e in train_rows)
    say(accelerator, f"labels: {n_good:,} desirable, {len(train_rows) - n_good:,} undesirable; weighted ratio "
                     f"lambda_D n_D / (lambda_U n_U) = "
                     f"{cfg.desirable_weight * n_good / max(cfg.undesirable_weight * (len(train_rows) - n_good), 1e-9):.2f}"
                     " (the KTO paper recommends 1 to 4/3)")
    capacity = pack_capacity(cfg, accelerator)
    pad_id = tokenizer.pad_token_id

    setup = build(cfg, tokenizer, accelerator)
    model = setup.model
    reference = reference_for(cfg, model, accelerator)
    def sequences(examples: list[UnpairedExample]) -> list:
        return [e.sequence for e in examples] + ([e.kl_sequence for e in examples] if cfg.kl_estimate else [])

    def store(examples: list[UnpairedExample], values) -> None:
        n = len(examples)
        for i, ex in enumerate(examples):
            ex.ref = float(values[i])
            if cfg.kl_estimate:
                ex.ref_kl = float(values[n + i])

    attach_reference_logps(cfg, model, accelerator, reference, {"train": train_rows, "eval": eval_rows},
                           pad_id=pad_id, capacity=capacity, sequences=sequences, store=store)

    def collate(examples: list[UnpairedExample]):
        return collate_kto(examples, pad_id, capacity, cfg.kl_estimate)

    engine = Engine(cfg, model, train_rows, collate, eval_rows, accelerator)
    say(accelerator, f"training {engine.total_steps} steps of {engine.global_batch} completions, beta {cfg.beta} "
                     f"({parallel(cfg, accelerator)})")
    fit = engine.fit(KTOObjective(cfg, reference))
    drop_reference_adapter(engine.model)
    out = finish(engine, fit, tokenizer, cfg, accelerator, "adapter" if cfg.method != "full" else "model")
    return TrainResult(output_dir=out, fit=fit, model=engine.model)
