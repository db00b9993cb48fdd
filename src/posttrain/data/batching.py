"""Batches: tokenized sequences laid into rows of tensors, one per row (padded) or several per row (packed).

One row planner and one layout serve every stage: SFT packs examples, DPO/RM pack chosen and rejected sequences,
KTO packs completions and their mismatched pairs, RL packs rollouts (data/groups.py lays out shared-prompt groups
with the same planner). Whether a method may pack at all is :func:`posttrain.methods.can_pack`.

Rows are planned by best-fit decreasing (each sequence, longest first, goes into the open row with the least room
left that still fits it). A packed row carries
- ``position_ids`` restarting at 0 for every sequence (RoPE sees the positions an unpacked row would); padding
  at the end of a row continues the last sequence's positions, so position 0 marks exactly the sequence starts;
- a block-diagonal causal attention mask, (B, 1, T, T) boolean, so no sequence attends to another. Position ids
  alone do NOT isolate sequences: the attention would still mix them;
- labels with -100 on each sequence's first token, so no sequence is trained to predict its successor's start.
Per-sequence logits and losses inside a pack equal the unpacked ones (tested).

Labels come from the loss mask, never from comparing ids with ``pad_id``: many tokenizers pad with EOS (SmolLM2
pads with ``<|im_end|>``), and the real end-of-turn tokens must stay targets.
"""

from __future__ import annotations

import bisect

import torch

from posttrain.data.tokenize import TokenizedExample
from posttrain.losses import IGNORE_INDEX


# --------------------------------------------------------------------------------------------- planning rows
def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group indices into bins of total length <= capacity. Deterministic; O(n log n)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # open bins sorted by remaining room: (room, bin index)
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


def plan_rows(lengths: list[int], capacity: int | None) -> list[list[int]]:
    """Which items share a row: one item per row when ``capacity`` is None, else packed rows of at most
    ``capacity`` tokens, each row's items in input order (so rows are deterministic whatever the sort ties)."""
    if capacity is None:
        return [[i] for i in range(len(lengths))]
    return [sorted(b) for b in best_fit_decreasing(lengths, capacity)]


def pack_examples(examples: list[TokenizedExample], capacity: int) -> list[list[TokenizedExample]]:
    """Examples grouped into packs of at most ``capacity`` tokens, each pack in dataset order."""
    return [[examples[i] for i in row] for row in plan_rows([len(e.input_ids) for e in examples], capacity)]


def packing_efficiency(packs: list[list[TokenizedExample]], capacity: int) -> float:
    """Share of the row budget filled with real tokens."""
    used = sum(len(e.input_ids) for pack in packs for e in pack)
    return used / max(1, capacity * len(packs))


# --------------------------------------------------------------------------------------------- the layout
def block_causal_mask(sequence_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean: causal attention within each sequence (``sequence_ids`` (B, T), -1 = padding).
    Padding positions attend to themselves only, so softmax never sees an all-masked row (NaN)."""
    width = sequence_ids.shape[1]
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    attention = same & causal & (sequence_ids[:, :, None] >= 0)
    attention |= torch.eye(width, dtype=torch.bool)[None] & (sequence_ids[:, :, None] < 0)
    return attention[:, None]


def lay_out(rows: list[list[int]], seqs: list[TokenizedExample], pad_id: int, *,
            ignore_first: bool = True) -> dict[str, torch.Tensor]:
    """``seqs`` placed in ``rows`` (lists of indices into ``seqs``): ``input_ids``, ``labels``, ``position_ids``,
    ``sequence_ids`` (rows, T; which of ``seqs`` each position holds, -1 for padding) and ``last_index`` (S, 2):
    the (row, column) of each sequence's last token that is not ``pad_id``, where a sequence-classification head
    reads its score (transformers' own rule, so scores match at inference). ``ignore_first=False`` keeps a
    sequence's first label (never a target once the loss shifts; SFT's padded batch keeps it, as it always has)."""
    width = max(sum(len(seqs[i].input_ids) for i in row) for row in rows)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    sequence_ids = torch.full((n_rows, width), -1, dtype=torch.long)
    last_index = torch.zeros((len(seqs), 2), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            seq = seqs[i]
            n = len(seq.input_ids)
            assert len(seq.loss_mask) == n, "loss_mask must have one entry per token"
            ids = torch.tensor(seq.input_ids, dtype=torch.long)
            input_ids[r, start:start + n] = ids
            labels[r, start:start + n] = torch.where(torch.tensor(seq.loss_mask, dtype=torch.bool), ids, IGNORE_INDEX)
            if ignore_first:
                labels[r, start] = IGNORE_INDEX  # nothing predicts a sequence's first token
            position_ids[r, start:start + n] = torch.arange(n)
            sequence_ids[r, start:start + n] = i
            last = next((k for k in range(n - 1, -1, -1) if seq.input_ids[k] != pad_id), n - 1)
            last_index[i, 0], last_index[i, 1] = r, start + last
            start += n
        position_ids[r, start:] = torch.arange(n, n + width - start)  # padding continues the last sequence
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "sequence_ids": sequence_ids,
            "last_index": last_index}


def collate_sequences(seqs: list[TokenizedExample], pad_id: int, pack_capacity: int | None = None) -> dict[str, torch.Tensor]:
    """Several independent sequences as one batch, one forward pass for all of them.

    Unpacked (``pack_capacity`` None): one right-padded row per sequence, 2-D attention mask. Packed: sequences
    share rows of ``pack_capacity`` tokens under a block-diagonal causal mask with restarting position ids, so
    none attends to another. Besides ``input_ids``/``attention_mask``/``labels`` (and ``position_ids`` when
    packed) the batch holds ``sequence_ids`` and ``last_index`` (see :func:`lay_out`)."""
    assert seqs, "collate_sequences needs at least one sequence"
    batch = lay_out(plan_rows([len(s.input_ids) for s in seqs], pack_capacity), seqs, pad_id)
    if pack_capacity is None:
        del batch["position_ids"]
        batch["attention_mask"] = (batch["sequence_ids"] >= 0).long()
    else:
        batch["attention_mask"] = block_causal_mask(batch["sequence_ids"])
    return batch


def collate_sft(batch: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids``, a (B, T) ``attention_mask`` and unshifted ``labels``,
    -100 where not trained."""
    assert batch, "collate_sft needs at least one example"
    out = lay_out([[i] for i in range(len(batch))], batch, pad_id, ignore_first=False)
    return {"input_ids": out["input_ids"], "attention_mask": (out["sequence_ids"] >= 0).long(), "labels": out["labels"]}


def collate_packed(packs: list[list[TokenizedExample]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packs (from :func:`pack_examples`) -> ``input_ids``, ``position_ids``, ``labels`` (B, T) and a
    block-diagonal causal mask (B, 1, T, T)."""
    seqs = [ex for pack in packs for ex in pack]
    rows, start = [], 0
    for pack in packs:
        rows.append(list(range(start, start + len(pack))))
        start += len(pack)
    out = lay_out(rows, seqs, pad_id)
    return {"input_ids": out["input_ids"], "position_ids": out["position_ids"],
            "attention_mask": block_causal_mask(out["sequence_ids"]), "labels": out["labels"]}
