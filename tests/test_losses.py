"""Losses against hand-computed values."""

import math

import torch

from posttrain.losses import causal_lm_loss, count_loss_tokens


def test_causal_lm_loss_by_hand():
    # vocab 3, one sequence of 3 tokens; targets are tokens 1 and 2 (token 0 is the prompt).
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [5.0, 5.0, 5.0]]])
    labels = torch.tensor([[-100, 2, 0]])
    loss_sum, metrics = causal_lm_loss(logits, labels)
    # position 0 predicts token 2: -log softmax([0,1,2])[2]; position 1 predicts token 0: -log softmax([1,0,0])[0]
    lse0 = math.log(math.exp(0) + math.exp(1) + math.exp(2))
    lse1 = math.log(math.exp(1) + 2.0)
    expected = (lse0 - 2.0) + (lse1 - 1.0)
    assert math.isclose(float(loss_sum), expected, rel_tol=1e-6)
    assert int(metrics["tokens"]) == 2 == count_loss_tokens(labels)


def test_padding_and_masked_positions_do_not_count():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 7)
    labels = torch.tensor([[1, 2, 3, -100]])
    padded_logits = torch.cat([logits, torch.randn(1, 3, 7)], dim=1)
    padded_labels = torch.tensor([[1, 2, 3, -100, -100, -100, -100]])
    a, _ = causal_lm_loss(logits, labels)
    b, _ = causal_lm_loss(padded_logits, padded_labels)
    assert torch.allclose(a, b)


def test_gradient_raises_target_logit():
    logits = torch.zeros(1, 2, 4, requires_grad=True)
    loss, _ = causal_lm_loss(logits, torch.tensor([[0, 3]]))
    loss.backward()
    assert logits.grad[0, 0, 3] < 0  # descending the loss raises the target's logit
    assert torch.all(logits.grad[0, 0, :3] > 0)
    assert torch.all(logits.grad[0, 1] == 0)  # the last position predicts nothing
