"""Collate RL groups (one prompt, several completions) so the prompt is computed once per group.

GRPO samples ``n`` completions of each prompt. Laid out as ``n`` separate sequences, a training forward computes
the prompt ``n`` times (and the reference pass ``n`` times more), although every copy has the same hidden states.
Here a group is one packed unit::

    [ p_0 ... p_{P-2} ] [ p_{P-1} c^1_1 ... c^1_{C1} ] [ p_{P-1} c^2_1 ... ] ...
      shared prefix       completion 1's span            completion 2's span

Each completion span starts with a copy of the prompt's last token at the same position (P-1), attends to the
prefix in full and to itself causally, and continues the prompt's position ids. So every position has exactly the
context and position it has in the separate layout, and its hidden state, log-probs and gradients are the same
(tested), while the prompt costs ``P - 1 + n`` token positions instead of ``n * P``. With a 60-token prompt, 8
completions of 30 tokens: 307 positions instead of 720.

The batch carries the usual keys (``input_ids``, ``labels``, ``position_ids``, ``sequence_ids``, ``last_index``
and a (rows, 1, T, T) boolean ``attention_mask`` that expresses the same structure for sdpa/eager attention) plus
``segment_table`` (K, 5): ``[row, start, end, prefix_start, prefix_end]`` of every span, which ``packed_spans``
uses instead of the mask. Sequence ``g * n + j`` is completion j of group g, as the rollout engine orders them.
"""

from __future__ import annotations

import torch

from posttrain.data.batching import plan_rows
from posttrain.losses import IGNORE_INDEX

PREFIX = -2  # sequence_ids of shared prompt positions (context for several sequences, never a target)


def group_length(prompt: list[int], completions: list[list[int]]) -> int:
    return len(prompt) - 1 + sum(1 + len(c) for c in completions)


def collate_groups(groups: list[tuple[list[int], list[list[int]]]], pad_id: int, capacity: int | None = None) -> dict[str, torch.Tensor]:
    """``groups``: (prompt ids, [completion ids, ...]) with the same number of completions each. See module docstring."""
    assert groups, "collate_groups needs at least one group"
    lengths = [group_length(p, cs) for p, cs in groups]
    rows = plan_rows(lengths, None if capacity is None else max(capacity, max(lengths)))
    width = max(sum(lengths[g] for g in row) for row in rows)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    sequence_ids = torch.full((n_rows, width), -1, dtype=torch.long)
    attention = torch.zeros((n_rows, width, width), dtype=torch.bool)
    starts = [0]
    for _, cs in groups:
        starts.append(starts[-1] + len(cs))
    last_index = torch.zeros((starts[-1], 2), dtype=torch.long)
    table: list[list[int]] = []

    def span(r: int, s: int, e: int, ps: int = 0, pe: int = 0) -> None:
        table.append([r, s, e, ps, pe])
        attention[r, s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
        if pe > ps:
            attention[r, s:e, ps:pe] = True

    for r, row in enumerate(rows):
        cursor = 0
        for g in row:
            prompt, completions = groups[g]
            p = len(prompt)
            ps, pe = cursor, cursor + p - 1
            input_ids[r, ps:pe] = torch.tensor(prompt[:-1], dtype=torch.long)
            position_ids[r, ps:pe] = torch.arange(p - 1)
            sequence_ids[r, ps:pe] = PREFIX
            if pe > ps:
                span(r, ps, pe)
            cursor = pe
            for j, c in enumerate(completions):
                i = starts[g] + j
                s, e = cursor, cursor + 1 + len(c)
                ids = torch.tensor([prompt[-1], *c], dtype=torch.long)
                input_ids[r, s:e] = ids
                labels[r, s + 1 : e] = ids[1:]
                position_ids[r, s:e] = torch.arange(p - 1, p + len(c))
                sequence_ids[r, s:e] = i
                last_index[i] = torch.tensor([r, e - 1])
                span(r, s, e, ps, pe)
                cursor = e
        if cursor < width:  # padding: its own span, so every position has some attention
            position_ids[r, cursor:] = torch.arange(width - cursor)
            span(r, cursor, width)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "sequence_ids": sequence_ids,
            "last_index": last_index, "attention_mask": attention[:, None], "segment_table": torch.tensor(table, dtype=torch.long)}
