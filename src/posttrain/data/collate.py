"""Pad tokenized SFT examples into a batch of tensors.

Labels come from the loss mask, never from comparing ids with ``pad_id``: many tokenizers pad with
EOS (SmolLM2 pads with ``<|im_end|>``), and the real end-of-turn tokens must stay targets.
"""

from __future__ import annotations

import torch

from posttrain.data.tokenize import TokenizedExample

IGNORE_INDEX = -100  # the label that torch's cross_entropy skips


def collate_sft(batch: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; labels are unshifted input ids, -100 where not trained."""
    assert batch, "collate_sft needs at least one example"
    length = max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, ex in enumerate(batch):
        assert len(ex.input_ids) == len(ex.loss_mask), "loss_mask must have one entry per token"
        n = len(ex.input_ids)
        ids = torch.tensor(ex.input_ids, dtype=torch.long)
        input_ids[row, :n] = ids
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.where(torch.tensor(ex.loss_mask, dtype=torch.bool), ids, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
