"""Padding-free packing: several examples share one row, each attending only to itself.

Examples are packed into rows of at most ``capacity`` tokens by best-fit decreasing (each example, longest
first, goes into the open row with the least room left that still fits it). A packed row carries
- ``position_ids`` restarting at 0 for every example (RoPE sees the positions an unpacked row would); padding
  at the end of a row continues the last example's positions, so position 0 marks exactly the example starts;
- a block-diagonal causal attention mask, (B, 1, T, T) boolean, so no example attends to another. Position ids
  alone do NOT isolate examples: the attention would still mix them;
- labels with -100 on each example's first token, so no example is trained to predict its successor's start.
Per-example logits and losses inside a pack equal the unpacked ones (tested).
"""

from __future__ import annotations

import bisect

import torch

from posttrain.data.tokenize import TokenizedExample
from posttrain.losses import IGNORE_INDEX


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group example indices into bins of total length <= capacity. Deterministic; O(n log n)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # open bins sorted by remaining room: (room, bin index)
    rooms: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the pack capacity {capacity}")
        pos = bisect.bisect_left(rooms, (n, -1))
        if pos < len(rooms):
            room, b = rooms.pop(pos)
            bins[b].append(i)
            room -= n
        else:
            b = len(bins)
            bins.append([i])
            room = capacity - n
        if room > 0:
            bisect.insort(rooms, (room, b))
    return bins


def pack_examples(examples: list[TokenizedExample], capacity: int) -> list[list[TokenizedExample]]:
    bins = best_fit_decreasing([len(e.input_ids) for e in examples], capacity)
    # Keep each pack's examples in dataset order: packs are deterministic whatever the sort tie-breaks.
    return [[examples[i] for i in sorted(b)] for b in bins]


def collate_packed(packs: list[list[TokenizedExample]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packs -> input_ids, position_ids, labels (B, T) and a block-diagonal causal mask (B, 1, T, T)."""
    width = max(sum(len(e.input_ids) for e in pack) for pack in packs)
    batch = len(packs)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    segment = torch.full((batch, width), -1, dtype=torch.long)  # example index within the row; -1 = padding
    for row, pack in enumerate(packs):
        start = 0
        for k, ex in enumerate(pack):
            n = len(ex.input_ids)
            ids = torch.tensor(ex.input_ids, dtype=torch.long)
            mask = torch.tensor(ex.loss_mask, dtype=torch.bool)
            input_ids[row, start : start + n] = ids
            labels[row, start : start + n] = torch.where(mask, ids, IGNORE_INDEX)
            labels[row, start] = IGNORE_INDEX  # never predicted across the boundary
            position_ids[row, start : start + n] = torch.arange(n)
            segment[row, start : start + n] = k
            start += n
        # Padding continues the last example's positions: one span with it, which causality keeps unseen.
        position_ids[row, start:] = torch.arange(n, n + width - start)
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    same = segment[:, :, None] == segment[:, None, :]  # (B, T, T)
    attention = same & causal & (segment[:, :, None] >= 0)
    # Padding rows attend to themselves only, so softmax never sees an all-masked row (NaN).
    attention |= torch.eye(width, dtype=torch.bool)[None] & (segment[:, :, None] < 0)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": attention[:, None],
        "labels": labels,
    }


def packing_efficiency(packs: list[list[TokenizedExample]], capacity: int) -> float:
    """Share of the row budget filled with real tokens."""
    used = sum(len(e.input_ids) for pack in packs for e in pack)
    return used / max(1, capacity * len(packs))
