"""MoE routers' load-balancing loss, added to training the way the families' own training code adds it.

transformers' Qwen3-MoE and gpt-oss causal LMs compute the Switch-Transformer load-balancing loss (Fedus et al.
2021, eq. 4: ``num_experts * sum_i f_i P_i``) when the config's ``output_router_logits`` is true, and add
``router_aux_loss_coef`` times it to the language-modelling loss of each forward. The released checkpoints set
``output_router_logits: false``, so by default no auxiliary loss is trained (as with transformers' Trainer); a
config that sets it true gets the same term here, in every stage:

- each training forward (gradients on) inside :func:`collecting` records ``coef * aux_loss`` as transformers
  computed it (over every position of the batch, padding of packed rows included: packed batches pass no 2-D
  mask it could exclude them with);
- the engine adds the mean over the step's micro-batches to the step's loss, as transformers' Trainer does when
  it averages each micro-batch's loss (which includes the term) over gradient accumulation.

Reference and rollout passes run without gradients and add nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_collected: list[torch.Tensor] | None = None


@contextlib.contextmanager
def collecting() -> Iterator[list[torch.Tensor]]:
    """Within the block, training forwards append their weighted auxiliary loss to the yielded list."""
    global _collected
    outer, _collected = _collected, []
    try:
        yield _collected
    finally:
        _collected = outer


def wanted(config) -> bool:
    """The family adds a router loss in training (its config asks for router logits)."""
    return bool(getattr(config, "output_router_logits", False))


def record(config, output) -> None:
    """Keep ``coef * output.aux_loss`` of a forward with gradients, when collecting."""
    aux = getattr(output, "aux_loss", None)
    if _collected is not None and aux is not None and torch.is_grad_enabled():
        _collected.append(aux.float() * float(getattr(config, "router_aux_loss_coef", 0.0)))
