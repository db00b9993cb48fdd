"""Loss functions: pure tensor math, no model forward inside.

Every loss returns ``(loss_sum, metrics)`` where ``loss_sum`` is a SUM over its normalisation units
(tokens for language modelling), never a mean: the engine divides by the number of units in the whole
optimizer step across micro-batches and processes (torchtitan's global-token normalisation), so that
batch 8 x accumulation 1, batch 2 x accumulation 4 and 2 processes x batch 4 give the same update.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels aligned with inputs -> (B, T) targets aligned with logits: position t predicts t+1."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed next-token cross-entropy from full (B, T, V) logits.

    The reference implementation: training uses ``models.forward.target_logps`` + :func:`sft_loss`, which never
    builds the full logits; tests check the two agree.

    loss_sum = - sum_{t : y_{t+1} != -100} log p(y_{t+1} | y_{<=t})

    Args:
        logits: (B, T, V) next-token logits for positions 0..T-1.
        labels: (B, T) token ids aligned with the inputs, -100 where the token is not a target.
    Returns:
        loss_sum (scalar, fp32) and metrics {"loss_sum", "tokens"}.
    """
    targets = shift_labels(labels)  # (B, T)
    mask = targets != IGNORE_INDEX
    # Only materialise fp32 log-softmax rows for target positions: (N, V) instead of (B, T, V).
    picked_logits = logits[mask].float()  # (N, V)
    loss_sum = F.cross_entropy(picked_logits, targets[mask], reduction="sum")
    return loss_sum, {"loss_sum": loss_sum.detach(), "tokens": mask.sum()}


def sft_loss(target_logps: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed negative log-likelihood of the target tokens: loss_sum = - sum_i log p(y_i | y_<i).

    Args:
        target_logps: (N,) log-probs of the N target tokens (see ``models.forward.target_logps``).
    """
    loss_sum = -target_logps.sum()
    return loss_sum, {"loss_sum": loss_sum.detach(), "tokens": torch.tensor(target_logps.numel())}


def count_loss_tokens(labels: torch.Tensor) -> int:
    """Number of target tokens in a (B, T) label tensor (the normaliser of causal_lm_loss)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
