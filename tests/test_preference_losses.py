"""Preference losses against hand-computed values, and the direction of their gradients.

The expected numbers were computed by hand from each paper's formula (written in each loss's docstring), e.g.
DPO pair 1: h = (-10 - -11) - (-12 - -11) = 2, beta h = 0.2, -log sigma(0.2) = log(1 + e^-0.2) = 0.598139.
"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses import DPO_LOSSES, bradley_terry_loss, dpo_loss, kto_loss, kto_reference_point

# Two pairs: h = 2 (chosen ahead of the reference) and h = -1 (rejected ahead).
CHOSEN = torch.tensor([-10.0, -5.0], dtype=torch.float64)
REJECTED = torch.tensor([-12.0, -4.0], dtype=torch.float64)
REF_CHOSEN = torch.tensor([-11.0, -5.0], dtype=torch.float64)
REF_REJECTED = torch.tensor([-11.0, -5.0], dtype=torch.float64)

HAND = {  # (loss_type, label_smoothing) -> per-pair losses at beta 0.1
    ("sigmoid", 0.0): (0.5981388693815918, 0.744396660073571),
    ("sigmoid", 0.1): (0.6181388693815918, 0.734396660073571),  # conservative DPO
    ("robust", 0.1): (0.5731388693815918, 0.756896660073571),
    ("ipo", 0.0): (9.0, 36.0),  # (2 - 1/0.2)^2, (-1 - 5)^2
    ("hinge", 0.0): (0.8, 1.1),  # 1 - 0.2, 1 + 0.1
}


@pytest.mark.parametrize("loss_type, eps", list(HAND))
def test_dpo_family_matches_hand_computed_values(loss_type, eps):
    loss, metrics = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.1, loss_type=loss_type, label_smoothing=eps)
    assert float(loss) == pytest.approx(sum(HAND[(loss_type, eps)]), rel=1e-12)
    # rewards are beta * (policy - reference) log-ratios: chosen (0.1, 0), rejected (-0.1, 0.1)
    assert float(metrics["rewards/chosen"]) == pytest.approx(0.1)
    assert float(metrics["rewards/rejected"]) == pytest.approx(0.0)
    assert float(metrics["rewards/margins"]) == pytest.approx(0.2 - 0.1)
    assert float(metrics["rewards/accuracy"]) == 1.0  # pair 1 right, pair 2 wrong
    assert float(metrics["kl"]) == pytest.approx((1 - 1) / 2 + (0 + 1) / 2)


def test_simpo_matches_hand_value_and_never_reads_the_reference():
    tokens_c, tokens_r = torch.tensor([5.0]), torch.tensor([4.0])
    # beta 2, gamma 0.5: 2 * (-10/5) - 2 * (-12/4) - 0.5 = 1.5; -log sigma(1.5) = 0.201413
    loss, metrics = dpo_loss(CHOSEN[:1], REJECTED[:1], None, None, beta=2.0, loss_type="simpo",
                             chosen_tokens=tokens_c, rejected_tokens=tokens_r, simpo_gamma=0.5)
    assert float(loss) == pytest.approx(0.2014132779827524, rel=1e-12)
    assert "kl" not in metrics
    # Any reference, even NaN, leaves it unchanged.
    nan = torch.tensor([float("nan")], dtype=torch.float64)
    again, _ = dpo_loss(CHOSEN[:1], REJECTED[:1], nan, nan, beta=2.0, loss_type="simpo",
                        chosen_tokens=tokens_c, rejected_tokens=tokens_r, simpo_gamma=0.5)
    assert float(again) == float(loss)


def test_rpo_adds_alpha_times_the_chosen_mean_nll_per_token():
    tokens_c, tokens_r = torch.tensor([5.0, 2.0], dtype=torch.float64), torch.tensor([4.0, 4.0], dtype=torch.float64)
    loss, metrics = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.1, chosen_tokens=tokens_c,
                             rejected_tokens=tokens_r, rpo_alpha=0.5)
    # DPO's two pair losses (hand values above) + 0.5 * (10/5 + 5/2)
    assert float(loss) == pytest.approx(sum(HAND[("sigmoid", 0.0)]) + 0.5 * (2.0 + 2.5), rel=1e-12)
    assert float(metrics["nll/chosen"]) == pytest.approx(4.5)
    # its gradient raises the chosen log-prob even where DPO's alone is satisfied
    chosen = CHOSEN.clone().requires_grad_(True)
    dpo_loss(chosen, REJECTED - 100, REF_CHOSEN, REF_REJECTED, beta=0.1, chosen_tokens=tokens_c,
             rejected_tokens=tokens_r, rpo_alpha=1.0)[0].backward()
    assert (chosen.grad < 0).all()


@pytest.mark.parametrize("loss_type", DPO_LOSSES)
def test_every_preference_loss_pushes_chosen_up_relative_to_rejected(loss_type):
    chosen = torch.tensor([-10.0, -7.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-10.0, -6.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-10.0, -6.5], dtype=torch.float64)
    tokens = torch.tensor([4.0, 4.0])
    loss, _ = dpo_loss(chosen, rejected, ref, ref, beta=0.1, loss_type=loss_type, label_smoothing=0.1 if loss_type == "robust" else 0.0,
                       chosen_tokens=tokens, rejected_tokens=tokens)
    loss.backward()
    # Gradient descent moves chosen log-probs up and rejected down for every pair.
    assert (chosen.grad < 0).all(), chosen.grad
    assert (rejected.grad > 0).all(), rejected.grad
    # One small step along -grad widens the margin.
    with torch.no_grad():
        before = (chosen - rejected).clone()
        after = (chosen - 0.1 * chosen.grad) - (rejected - 0.1 * rejected.grad)
    assert (after > before).all()


def test_dpo_loss_at_the_reference_is_log_2():
    """Policy == reference gives h = 0 and -log sigma(0) = log 2 per pair: what step 1 of a fresh run must log."""
    loss, _ = dpo_loss(CHOSEN, REJECTED, CHOSEN, REJECTED, beta=0.1)
    assert float(loss) == pytest.approx(2 * math.log(2))


def test_kto_matches_hand_value():
    logps = torch.tensor([-3.0, -8.0], dtype=torch.float64)
    ref = torch.tensor([-4.0, -6.0], dtype=torch.float64)
    desirable = torch.tensor([True, False])
    # r = (1, -2), z0 = 0.5, beta 0.1: 1 * (1 - sigma(0.05)) + 2 * (1 - sigma(0.25)) = 1.363150
    loss, metrics = kto_loss(logps, ref, desirable, torch.tensor(0.5, dtype=torch.float64), beta=0.1,
                             desirable_weight=1.0, undesirable_weight=2.0)
    assert float(loss) == pytest.approx(1.3631496017441935, rel=1e-12)
    assert float(metrics["rewards/desirable"]) == pytest.approx(0.1)
    assert float(metrics["rewards/undesirable"]) == pytest.approx(-0.2)
    assert float(metrics["kl"]) == pytest.approx(1.0)  # z0 x 2 examples, logged as mean 0.5


def test_kto_gradient_raises_desirable_and_lowers_undesirable():
    logps = torch.tensor([-3.0, -8.0], dtype=torch.float64, requires_grad=True)
    loss, _ = kto_loss(logps, torch.tensor([-3.0, -8.0], dtype=torch.float64), torch.tensor([True, False]),
                       torch.tensor(0.0, dtype=torch.float64), beta=0.1)
    loss.backward()
    assert logps.grad[0] < 0 < logps.grad[1]


def test_kto_reference_point_is_clamped_and_detached():
    kl_logps = torch.tensor([-5.0, -7.0], requires_grad=True)
    assert float(kto_reference_point(kl_logps, torch.tensor([-4.0, -6.0]))) == 0.0  # mean -1 -> clamped
    z0 = kto_reference_point(kl_logps, torch.tensor([-6.0, -9.0]))  # mean 1.5
    assert float(z0) == pytest.approx(1.5) and not z0.requires_grad


def test_bradley_terry_matches_hand_values():
    chosen, rejected = torch.tensor([1.5, 0.2]), torch.tensor([0.5, 1.0])
    loss, metrics = bradley_terry_loss(chosen, rejected)
    # -log sigma(1.0) + -log sigma(-0.8)
    assert float(loss) == pytest.approx(0.3132616875182228 + 1.1711006659477778, rel=1e-6)
    assert float(metrics["accuracy"]) == 1.0 and float(metrics["margin"]) == pytest.approx(0.2)
    centred, _ = bradley_terry_loss(chosen, rejected, center_coefficient=0.01)
    assert float(centred - loss) == pytest.approx(0.01 * (2.0**2 + 1.2**2), rel=1e-5)
    with_margin, _ = bradley_terry_loss(chosen, rejected, margin=torch.tensor([1.0, 0.0]))
    assert float(with_margin) == pytest.approx(math.log(2) + 1.1711006659477778, rel=1e-6)
