"""Bradley-Terry reward model on prompt/chosen/rejected pairs: a scalar head on the base LM.

The model is transformers' ``AutoModelForSequenceClassification`` with one label (a ``score`` Linear on the
final hidden state of the last non-padding token), under any method: full fine-tuning saves a model that
``AutoModelForSequenceClassification.from_pretrained`` loads; adapter methods save a PEFT ``SEQ_CLS`` adapter
(the trained score head included) that ``PeftModel.from_pretrained`` puts on that base model, as
:func:`posttrain.rewards.model.load_reward_model` does. Chosen and rejected of a micro-batch run in one
forward pass (packed without cross-attention when the method allows). Units are pairs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from posttrain.data.preference import PairExample, collate_pairs, load_pair_dataset
from posttrain.engine.setup import (
    TrainResult,
    finish,
    load_tokenizer_for,
    load_train_eval,
    make_accelerator,
    pack_capacity,
    parallel,
    say,
)
from posttrain.engine.trainer import Engine
from posttrain.errors import ConfigError
from posttrain.losses import bradley_terry_loss
from posttrain.models.adapters import build_model
from posttrain.models.forward import sequence_scores
from posttrain.models.loading import load_config, require_sequence_classification

if TYPE_CHECKING:
    from posttrain.commands.rm import RMConfig


class RewardObjective:
    unit = "pairs"
    perplexity = False
    progress_keys = ("accuracy", "margin")

    def __init__(self, cfg: RMConfig):
        self.cfg = cfg

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["last_index"].shape[0] // 2

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        scores = sequence_scores(model, batch)  # (2B,)
        b = scores.shape[0] // 2
        return bradley_terry_loss(scores[:b], scores[b:], center_coefficient=self.cfg.center_rewards)



def train(cfg: RMConfig) -> TrainResult:
    if cfg.adapter and cfg.method != "full":
        raise ConfigError(
            "adapter: a reward model's adapter sits on a sequence-classification model, so it cannot continue a "
            "causal-LM adapter; merge it first (`posttrain merge adapter=... output_dir=merged`) and use "
            "model=merged, or use method=full"
        )
    require_sequence_classification(load_config(cfg.model, cfg.trust_remote_code))  # before the data, not after
    accelerator = make_accelerator(cfg)
    tokenizer = load_tokenizer_for(cfg)
    train_pairs, eval_pairs = load_train_eval(cfg, tokenizer, accelerator, load_pair_dataset)
    capacity = pack_capacity(cfg, accelerator)
    pad_id = tokenizer.pad_token_id

    model, report = build_model(cfg, device=accelerator.device, mixed_precision=accelerator.mixed_precision,
                                task="seq_cls", pad_token_id=pad_id)
    say(accelerator, report.summary())
    say(accelerator, "reward head: a new Linear(hidden, 1) on the last non-padding token, initialised randomly and trained")

    def collate(pairs: list[PairExample]):
        return collate_pairs(pairs, pad_id, capacity)

    engine = Engine(cfg, model, train_pairs, collate, eval_pairs, accelerator)
    say(accelerator, f"training {engine.total_steps} steps of {engine.global_batch} pairs "
                     f"({parallel(cfg, accelerator)})")
    fit = engine.fit(RewardObjective(cfg))
    out = finish(engine, fit, tokenizer, cfg, accelerator, "reward model")
    return TrainResult(output_dir=out, fit=fit, model=engine.model)
