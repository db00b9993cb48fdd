"""RL losses (GRPO, RLOO, k3 KL, PPO with GAE) against hand-computed values.

Every expected number is worked out by hand in a comment next to it from the formula in the loss's docstring
(e.g. GRPO advantage of rewards [1, 0, 0, 1]: mean 0.5, Bessel std sqrt(1/3), A = +-0.5 / (sqrt(1/3) + eps)),
never by calling the function under test a second way.
"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses import (
    clipped_surrogate,
    gae,
    group_advantages,
    grpo_loss,
    k3_kl,
    ppo_loss,
    rloo_advantages,
    rollout_is_weights,
    value_loss,
    whiten,
)

F64 = torch.float64
E = math.e

# Two groups of G=4: a mixed group and a constant group.
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=F64)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def close(actual: torch.Tensor, expected, tol: float = 1e-9) -> None:
    expected = torch.as_tensor(expected, dtype=F64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual.to(F64), expected, rtol=0, atol=tol)


# ------------------------------------------------------------------------------------------------ advantages


def test_group_advantages_scaled_by_group_std():
    # Group 1: mean 0.5, centred [0.5, -0.5, -0.5, 0.5]; sum of squares 4 * 0.25 = 1, Bessel var 1/3, std 0.5773503.
    # A = 0.5 / (0.5773503 + 1e-4) = 0.8658754 (and its negative). Group 2: constant -> centred 0 -> A = 0.
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert a == pytest.approx(0.8658754, abs=1e-7)
    close(group_advantages(REWARDS, 4), [a, -a, -a, a, 0, 0, 0, 0])
    # Without the eps the scaled advantage is exactly 0.5 / sqrt(1/3) = sqrt(3)/2.
    s = math.sqrt(3) / 2
    close(group_advantages(REWARDS, 4, eps=0.0)[:4], [s, -s, -s, s])


def test_group_advantages_without_std_scaling_is_the_centred_reward():
    # Dr. GRPO: A = r - mean_g(r) = [0.5, -0.5, -0.5, 0.5 | 0, 0, 0, 0].
    close(group_advantages(REWARDS, 4, scale_std=False), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], tol=0)


def test_group_advantages_scaling_uses_each_groups_own_std():
    # Group [0, 4]: mean 2, centred [-2, 2], Bessel std sqrt((4 + 4) / 1) = 2.828427 -> A = -+2 / 2.828427 = -+0.7071068.
    # Group [1, 1]: constant -> [0, 0].  Group size 2 here.
    r = t(0.0, 4.0, 1.0, 1.0)
    a = 2 / (math.sqrt(8) + 1e-4)
    close(group_advantages(r, 2), [-a, a, 0, 0])
    close(group_advantages(r, 2, scale_std=False), [-2, 2, 0, 0], tol=0)


def test_constant_groups_get_zero_advantage_and_dtype_is_kept():
    r = torch.full((8,), 3.0)  # float32
    for adv in (group_advantages(r, 4), group_advantages(r, 4, scale_std=False), rloo_advantages(r, 4)):
        assert adv.dtype == torch.float32
        assert torch.equal(adv, torch.zeros(8))


def test_rloo_leave_one_out_values():
    # [1, 0, 0, 1]: r_0 = 1, others (0 + 0 + 1)/3 = 1/3 -> 2/3;  r_1 = 0, others (1 + 0 + 1)/3 = 2/3 -> -2/3.
    # Constant group -> 0.
    close(rloo_advantages(REWARDS, 4), [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0])
    # An asymmetric group [3, 0, 0, 1]:
    #   A_0 = 3 - (0 + 0 + 1)/3 = 8/3;  A_1 = A_2 = 0 - (3 + 0 + 1)/3 = -4/3;  A_3 = 1 - (3 + 0 + 0)/3 = 0.
    close(rloo_advantages(t(3, 0, 0, 1), 4), [8 / 3, -4 / 3, -4 / 3, 0])
    # G = 2: each sample's baseline is the other sample: [5, 2] -> [3, -3].
    close(rloo_advantages(t(5, 2), 2), [3, -3])


def test_rloo_needs_two_samples():
    with pytest.raises(ValueError):
        rloo_advantages(t(1, 2, 3), 1)


# ------------------------------------------------------------------------------------------------ k3


def test_k3_hand_values():
    # d = q - p;  k3 = e^d - d - 1
    #   d = 0      -> 1 - 0 - 1 = 0
    #   d = 1      -> e - 2 = 0.7182818
    #   d = -1     -> e^-1 + 1 - 1 = 0.3678794
    #   d = log 2  -> 2 - 0.6931472 - 1 = 0.3068528
    p = t(-2.0, -2.0, -2.0, math.log(0.25))
    q = t(-2.0, -1.0, -3.0, math.log(0.5))
    close(k3_kl(p, q), [0.0, E - 2, 1 / E, 1 - math.log(2)])
    assert float(k3_kl(p, q)[1]) == pytest.approx(0.7182818, abs=1e-7)


def test_k3_is_nonnegative_and_zero_when_equal():
    g = torch.Generator().manual_seed(0)
    p = -torch.rand(1000, generator=g, dtype=F64) * 10
    q = -torch.rand(1000, generator=g, dtype=F64) * 10
    assert (k3_kl(p, q) >= 0).all()
    assert torch.equal(k3_kl(p, p), torch.zeros(1000, dtype=F64))


def test_k3_gradient_pushes_policy_towards_reference():
    # d k3 / d p = -e^(q-p) + 1: at q - p = 1 that is 1 - e < 0 (raise p), at q = p it is 0.
    p = t(-2.0, -2.0).requires_grad_()
    k3_kl(p, t(-1.0, -2.0)).sum().backward()
    close(p.grad, [1 - E, 0.0])


# ------------------------------------------------------------------------------------------------ clipping


def _surrogate(ratios, advantages, clip_low=0.2, clip_high=0.2):
    logps = torch.log(t(*ratios)).requires_grad_()
    losses, clipped = clipped_surrogate(logps, torch.zeros_like(logps), t(*advantages), clip_low=clip_low, clip_high=clip_high)
    losses.sum().backward()
    return losses.detach(), clipped, logps.grad


def test_clipped_surrogate_hand_values_and_zero_gradient_when_clipped():
    # eps = 0.2, clip range [0.8, 1.2]; l = -min(rho A, clip(rho) A); when unclipped dl/dlogp = -rho A.
    #   rho 1.5, A +1: min(1.5, 1.2)   = 1.2  -> l = -1.2, clipped, grad 0
    #   rho 0.5, A -1: min(-0.5, -0.8) = -0.8 -> l = 0.8,  clipped, grad 0
    #   rho 1.5, A -1: min(-1.5, -1.2) = -1.5 -> l = 1.5,  not clipped (pessimistic side), grad 1.5
    #   rho 0.5, A +1: min(0.5, 0.8)   = 0.5  -> l = -0.5, not clipped, grad -0.5
    #   rho 1.0, A +2: l = -2, not clipped, grad -2
    losses, clipped, grad = _surrogate([1.5, 0.5, 1.5, 0.5, 1.0], [1, -1, -1, 1, 2])
    close(losses, [-1.2, 0.8, 1.5, -0.5, -2.0])
    assert clipped.tolist() == [True, True, False, False, False]
    close(grad, [0.0, 0.0, 1.5, -0.5, -2.0])


def test_clip_higher_is_asymmetric():
    # clip_low 0.2, clip_high 0.28: range [0.8, 1.28].
    #   rho 1.25, A +1: 1.25 < 1.28 -> unclipped, l = -1.25, grad -1.25 (with symmetric 0.2 it would clip at 1.2)
    #   rho 1.3,  A +1: clipped at 1.28 -> l = -1.28, grad 0
    #   rho 0.75, A -1: clip at 0.8 -> min(-0.75, -0.8) = -0.8 -> l = 0.8, grad 0 (with symmetric 0.28: 0.75 > 0.72, unclipped)
    losses, clipped, grad = _surrogate([1.25, 1.3, 0.75], [1, 1, -1], clip_low=0.2, clip_high=0.28)
    close(losses, [-1.25, -1.28, 0.8])
    assert clipped.tolist() == [False, True, True]
    close(grad, [-1.25, 0.0, 0.0])
    # Symmetric 0.2: rho 1.25 now clips at 1.2.
    losses, clipped, _ = _surrogate([1.25], [1], clip_low=0.2, clip_high=0.2)
    close(losses, [-1.2])
    assert clipped.tolist() == [True]
    # Symmetric 0.28: rho 0.75 with A -1 is inside [0.72, 1.28] -> l = 0.75.
    losses, clipped, _ = _surrogate([0.75], [-1], clip_low=0.28, clip_high=0.28)
    close(losses, [0.75])
    assert clipped.tolist() == [False]


# ------------------------------------------------------------------------------------------------ GRPO

# Two completions of different lengths: sequence 0 has 2 tokens, sequence 1 has 3.
SEQ = torch.tensor([0, 0, 1, 1, 1])


def test_grpo_loss_token_vs_sequence_normalisation():
    # Ratios per token and advantages A = [+1, -1], eps 0.2:
    #   seq 0 (A +1): rho 1.0 -> -1;  rho 1.5 -> -min(1.5, 1.2) = -1.2 (clipped)
    #   seq 1 (A -1): rho 1.0 -> 1;   rho 0.5 -> -min(-0.5, -0.8) = 0.8 (clipped);  rho 1.1 -> 1.1
    # token:    -1 - 1.2 + 1 + 0.8 + 1.1 = 0.7
    # sequence: (-1 - 1.2)/2 + (1 + 0.8 + 1.1)/3 = -1.1 + 0.9666667 = -0.1333333
    ratios = t(1.0, 1.5, 1.0, 0.5, 1.1)
    old = t(-1.0, -2.0, -3.0, -0.5, -1.5)
    logps = old + torch.log(ratios)
    adv = t(1.0, -1.0)
    loss, m = grpo_loss(logps, old, adv, SEQ, 2, norm="token")
    assert float(loss) == pytest.approx(0.7, abs=1e-12)
    assert float(m["clip_fraction"]) == pytest.approx(2.0)  # two clipped tokens
    assert float(m["ratio"]) == pytest.approx(1 + 1.5 + 1 + 0.5 + 1.1)  # 5.1
    assert float(m["kl"]) == 0.0  # no reference
    loss, m = grpo_loss(logps, old, adv, SEQ, 2, norm="sequence")
    assert float(loss) == pytest.approx(-1.1 + 2.9 / 3, abs=1e-12)
    assert float(loss) == pytest.approx(-0.1333333, abs=1e-7)
    assert float(m["clip_fraction"]) == pytest.approx(1 / 2 + 1 / 3)  # 0.8333333
    assert float(m["ratio"]) == pytest.approx(2.5 / 2 + 2.6 / 3)  # 1.25 + 0.8666667 = 2.1166667


def test_grpo_loss_beta_k3_term():
    # Ratio 1 everywhere (logps == old == 0), A = [+1, -1] -> surrogate per token [-1, -1, 1, 1, 1].
    # ref - logps = [0, 1, -1, 0, log 2] -> k3 = [0, e - 2, e^-1, 0, 1 - log 2] = [0, .7182818, .3678794, 0, .3068528]
    # sum k3 = 1.3930140.   beta = 0.1.
    # token:    (-2 + 3) + 0.1 * 1.3930140 = 1.1393014
    # sequence: (-2 + 0.1 * 0.7182818) / 2 + (3 + 0.1 * (0.3678794 + 0.3068528)) / 3
    #         = -0.9640859 + 1.0224911 = 0.0584052
    k3 = [0.0, E - 2, 1 / E, 0.0, 1 - math.log(2)]
    logps = torch.zeros(5, dtype=F64)
    ref = t(0.0, 1.0, -1.0, 0.0, math.log(2))
    adv = t(1.0, -1.0)
    loss, m = grpo_loss(logps, logps.clone(), adv, SEQ, 2, ref_logps=ref, beta=0.1, norm="token")
    assert float(loss) == pytest.approx(1 + 0.1 * sum(k3), abs=1e-12)
    assert float(loss) == pytest.approx(1.1393014, abs=1e-7)
    assert float(m["kl"]) == pytest.approx(sum(k3), abs=1e-12)
    assert float(m["clip_fraction"]) == 0.0
    assert float(m["ratio"]) == pytest.approx(5.0)
    loss, m = grpo_loss(logps, logps.clone(), adv, SEQ, 2, ref_logps=ref, beta=0.1, norm="sequence")
    assert float(loss) == pytest.approx((-2 + 0.1 * k3[1]) / 2 + (3 + 0.1 * (k3[2] + k3[4])) / 3, abs=1e-12)
    assert float(loss) == pytest.approx(0.0584052, abs=1e-7)
    assert float(m["kl"]) == pytest.approx(k3[1] / 2 + (k3[2] + k3[4]) / 3, abs=1e-12)  # 0.3591409 + 0.2249107
    # beta = 0 with a reference: the KL is reported but not in the loss (token: -2 + 3 = 1).
    loss, m = grpo_loss(logps, logps.clone(), adv, SEQ, 2, ref_logps=ref, beta=0.0, norm="token")
    assert float(loss) == pytest.approx(1.0, abs=1e-12)
    assert float(m["kl"]) == pytest.approx(sum(k3), abs=1e-12)


def test_grpo_gradient_at_ratio_one_is_minus_advantage_per_token():
    # First update of a rollout: old = logps.detach(), rho = 1, d(-rho A)/dlogp = -rho A = -A.
    logps = t(-0.3, -1.2, -0.7, -2.0, -0.1).requires_grad_()
    adv = t(0.75, -2.0)
    loss, _ = grpo_loss(logps, logps.detach(), adv, SEQ, 2, norm="token")
    loss.backward()
    close(logps.grad, [-0.75, -0.75, 2.0, 2.0, 2.0], tol=1e-12)
    # Sequence normalisation divides by the completion's length: [-0.75/2, -0.75/2, 2/3, 2/3, 2/3].
    logps.grad = None
    loss, _ = grpo_loss(logps, logps.detach(), adv, SEQ, 2, norm="sequence")
    loss.backward()
    close(logps.grad, [-0.375, -0.375, 2 / 3, 2 / 3, 2 / 3], tol=1e-12)


# ------------------------------------------------------------------------------------------------ rollout IS correction
def test_rollout_is_weights_truncate_mask_none_by_hand():
    # rho = exp(old - q) = [e^-1, 1, 1.5, e, 3], cap 2:
    #   truncate: [0.3678794, 1, 1.5, 2, 2]       capped [F, F, F, T, T]
    #   mask:     [0.3678794, 1, 1.5, 0, 0]
    old = t(-2.0, -1.0, math.log(1.5) - 1.0, 0.0, math.log(3.0) - 4.0)
    q = t(-1.0, -1.0, -1.0, -1.0, -4.0)
    w, capped = rollout_is_weights(old, q, mode="truncate", cap=2.0)
    close(w, [1 / E, 1.0, 1.5, 2.0, 2.0], tol=1e-12)
    assert capped.tolist() == [False, False, False, True, True]
    w, _ = rollout_is_weights(old, q, mode="mask", cap=2.0)
    close(w, [1 / E, 1.0, 1.5, 0.0, 0.0], tol=1e-12)
    w, capped = rollout_is_weights(old, q, mode="none", cap=2.0)
    close(w, [1.0] * 5, tol=0)
    assert not capped.any()
    with pytest.raises(ValueError, match="mode"):
        rollout_is_weights(old, q, mode="clip", cap=2.0)


def test_grpo_loss_weights_the_surrogate_not_the_kl_and_reports_the_gap():
    # First update (rho_policy = 1), A = [+1, -1] -> surrogate per token [-1, -1, 1, 1, 1].
    # behaviour q: old - q = [0, log 0.5, log 4, 0, log 1.5] -> TIS weights (cap 2) [1, 0.5, 2, 1, 1.5]
    #   token loss: -1 - 0.5 + 2 + 1 + 1.5 = 3.0   (without correction: 1.0)
    #   |old - q| summed: 0 + log 2 + log 4 + 0 + log 1.5 = 2.4849066 + 0.4054651 = 2.8903718
    # with beta 0.1 and k3 = [0, e - 2, 0, 0, 0] (ref - logps = [0, 1, 0, 0, 0]): + 0.1 (e - 2), unweighted.
    logps = torch.zeros(5, dtype=F64).requires_grad_()
    q = -t(0.0, math.log(0.5), math.log(4.0), 0.0, math.log(1.5))
    adv = t(1.0, -1.0)
    loss, m = grpo_loss(logps, logps.detach(), adv, SEQ, 2, norm="token", behaviour_logps=q, correction="truncate",
                        correction_cap=2.0)
    assert float(loss) == pytest.approx(3.0, abs=1e-12)
    assert float(m["rollout/logp_gap"]) == pytest.approx(math.log(2) + math.log(4) + math.log(1.5), abs=1e-12)
    assert float(m["rollout/is_weight"]) == pytest.approx(1 + 0.5 + 2 + 1 + 1.5, abs=1e-12)
    assert float(m["rollout/is_capped"]) == 1.0  # rho 4 was truncated to 2
    loss.backward()
    close(logps.grad, [-1.0, -0.5, 2.0, 1.0, 1.5], tol=1e-12)  # -A w: the weight scales each token's gradient
    ref = t(0.0, 1.0, 0.0, 0.0, 0.0)
    loss, _ = grpo_loss(logps, logps.detach(), adv, SEQ, 2, norm="token", ref_logps=ref, beta=0.1, behaviour_logps=q,
                        correction="truncate", correction_cap=2.0)
    assert float(loss) == pytest.approx(3.0 + 0.1 * (E - 2), abs=1e-12)
    # mask drops the token whose ratio (4) is over the cap: -1 - 0.5 + 0 + 1 + 1.5 = 1.0
    loss, _ = grpo_loss(logps, logps.detach(), adv, SEQ, 2, norm="token", behaviour_logps=q, correction="mask",
                        correction_cap=2.0)
    assert float(loss) == pytest.approx(1.0, abs=1e-12)
    # none: the gap is still reported, the loss is the uncorrected one
    loss, m = grpo_loss(logps, logps.detach(), adv, SEQ, 2, norm="token", behaviour_logps=q, correction="none")
    assert float(loss) == pytest.approx(1.0, abs=1e-12) and float(m["rollout/is_weight"]) == pytest.approx(5.0)


def test_ppo_loss_weights_the_policy_term_only():
    # rho_policy = 1, advantages [1, -2], behaviour weights (cap 2) [2, 0.5]; values equal returns (no value loss).
    logps = torch.zeros(2, dtype=F64)
    q = t(-math.log(3.0), math.log(2.0))  # old - q = [log 3, -log 2] -> rho [3, 0.5] -> truncated [2, 0.5]
    values = t(0.5, 0.5)
    loss, m = ppo_loss(logps, logps, t(1.0, -2.0), values, values, values, behaviour_logps=q, correction="truncate",
                       correction_cap=2.0)
    # policy: -1 * 2 + 2 * 0.5 = -1.0
    assert float(loss) == pytest.approx(-1.0, abs=1e-12) and float(m["policy_loss"]) == pytest.approx(-1.0, abs=1e-12)
    assert float(m["rollout/is_capped"]) == 1.0


# ------------------------------------------------------------------------------------------------ whiten


def test_whiten_hand_values():
    # [1, 2, 3, 4]: mean 2.5, biased var (2.25 + 0.25 + 0.25 + 2.25)/4 = 1.25.
    x = t(1.0, 2.0, 3.0, 4.0)
    s = math.sqrt(1.25 + 1e-8)
    close(whiten(x), [-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s])
    # shift_mean=False adds the mean back: 2.5 + [-1.3416408, -0.4472136, 0.4472136, 1.3416408].
    close(whiten(x, shift_mean=False), [2.5 - 1.5 / s, 2.5 - 0.5 / s, 2.5 + 0.5 / s, 2.5 + 1.5 / s])
    assert float(whiten(x, shift_mean=False)[0]) == pytest.approx(1.1583592, abs=1e-7)
    w = whiten(x)
    assert float(w.mean()) == pytest.approx(0.0, abs=1e-12)
    assert float(w.var(unbiased=False)) == pytest.approx(1.0, abs=1e-7)


# ------------------------------------------------------------------------------------------------ GAE


def test_gae_gamma_one_lambda_one_is_reward_to_go_minus_value():
    # gamma = lam = 1: A_t = sum_{k >= t} delta_k telescopes to (sum_{k >= t} r_k) - V_t (the value after the end is 0).
    # Row 0 (3 tokens): r [0, 0, 1], V [0.5, 0.2, 0.3] -> reward-to-go [1, 1, 1] -> A [0.5, 0.8, 0.7], returns [1, 1, 1].
    # Row 1 (2 tokens + padding holding garbage 99): r [1, 2], V [0.1, 0.4] -> to-go [3, 2] -> A [2.9, 1.6], returns [3, 2].
    rewards = t(0, 0, 1, 1, 2, 99).reshape(2, 3)
    values = t(0.5, 0.2, 0.3, 0.1, 0.4, 99).reshape(2, 3)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(adv, [[0.5, 0.8, 0.7], [2.9, 1.6, 0.0]], tol=1e-12)
    close(ret, [[1.0, 1.0, 1.0], [3.0, 2.0, 0.0]], tol=1e-12)


def test_gae_half_gamma_half_lambda_by_hand():
    # gamma = lam = 0.5 (gamma lam = 0.25); r [0.1, -0.2, 1.0], V [0.5, 0.2, 0.4], V after the end 0.
    #   t=2: delta = 1.0 + 0.5*0     - 0.4 =  0.6;   A_2 = 0.6
    #   t=1: delta = -0.2 + 0.5*0.4  - 0.2 = -0.2;   A_1 = -0.2 + 0.25*0.6     = -0.05
    #   t=0: delta = 0.1 + 0.5*0.2   - 0.5 = -0.3;   A_0 = -0.3 + 0.25*(-0.05) = -0.3125
    #   returns = A + V = [0.1875, 0.15, 1.0]
    rewards = t(0.1, -0.2, 1.0).reshape(1, 3)
    values = t(0.5, 0.2, 0.4).reshape(1, 3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    close(adv, [[-0.3125, -0.05, 0.6]], tol=1e-12)
    close(ret, [[0.1875, 0.15, 1.0]], tol=1e-12)


def test_gae_padding_is_masked_and_does_not_leak():
    # The same 3-token sequence as above followed by 2 padding tokens with garbage rewards/values: the real tokens'
    # advantages are unchanged (the value after the last real token is 0, not the padding's 7) and padding is 0.
    rewards = t(0.1, -0.2, 1.0, 5.0, 5.0).reshape(1, 5)
    values = t(0.5, 0.2, 0.4, 7.0, 7.0).reshape(1, 5)
    mask = torch.tensor([[True, True, True, False, False]])
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    close(adv, [[-0.3125, -0.05, 0.6, 0.0, 0.0]], tol=1e-12)
    close(ret, [[0.1875, 0.15, 1.0, 0.0, 0.0]], tol=1e-12)
    # A fully padded row gives all zeros.
    adv, ret = gae(torch.ones(1, 3, dtype=F64), torch.ones(1, 3, dtype=F64), torch.zeros(1, 3, dtype=torch.bool), gamma=0.5, lam=0.5)
    assert torch.equal(adv, torch.zeros(1, 3, dtype=F64)) and torch.equal(ret, torch.zeros(1, 3, dtype=F64))


# ------------------------------------------------------------------------------------------------ value / PPO

# Three value cases at clip range 0.2, V_old = 0 (clip(V) in [-0.2, 0.2]):
#   a) V 1.0, R 0.5: plain (0.5)^2 = 0.25, clipped (0.2 - 0.5)^2 = 0.09  -> max plain   -> 0.125, not clipped
#   b) V 1.0, R 2.0: plain (-1)^2 = 1,      clipped (0.2 - 2)^2 = 3.24    -> max clipped -> 1.62,  clipped
#   c) V 0.1, R 1.0: inside the range, both 0.81                           -> 0.405, not clipped
V = (1.0, 1.0, 0.1)
R = (0.5, 2.0, 1.0)


def test_value_loss_takes_the_larger_clipped_branch():
    values = t(*V).requires_grad_()
    losses, clipped = value_loss(values, torch.zeros(3, dtype=F64), t(*R), clip_range=0.2)
    close(losses.detach(), [0.125, 1.62, 0.405], tol=1e-12)
    assert clipped.tolist() == [False, True, False]
    losses.sum().backward()
    # d/dV of 0.5 (V - R)^2 = V - R on the plain branch; the clipped branch is saturated -> 0.
    close(values.grad, [0.5, 0.0, -0.9], tol=1e-12)


def test_ppo_loss_metric_sums():
    # Policy (eps 0.2), old logps 0 so logps = log rho:
    #   rho 1,   A +1 -> -1
    #   rho 1.5, A +1 -> -1.2 (clipped)
    #   rho 0.5, A -1 -> 0.8  (clipped)             policy sum -1.4, clip_fraction 2
    # Values: cases a, b, c above -> 0.125 + 1.62 + 0.405 = 2.15, value_clip_fraction 1.
    # loss = -1.4 + 0.1 * 2.15 = -1.185
    logps = torch.log(t(1.0, 1.5, 0.5))
    old = torch.zeros(3, dtype=F64)
    adv = t(1.0, 1.0, -1.0)
    args = (logps, old, adv, t(*V), torch.zeros(3, dtype=F64), t(*R))
    loss, m = ppo_loss(*args, clip_range=0.2, value_clip_range=0.2, value_coef=0.1)
    assert float(loss) == pytest.approx(-1.185, abs=1e-12)
    assert float(m["policy_loss"]) == pytest.approx(-1.4, abs=1e-12)
    assert float(m["value_loss"]) == pytest.approx(2.15, abs=1e-12)
    assert float(m["clip_fraction"]) == 2.0
    assert float(m["value_clip_fraction"]) == 1.0
    assert float(m["kl"]) == 0.0
    # A k3 term: ref - logps = [0, 1, -1] -> k3 [0, e - 2, e^-1], sum 1.0861613; kl_coef 0.5 adds 0.5430806.
    ref = logps + t(0.0, 1.0, -1.0)
    k3_sum = (E - 2) + 1 / E
    loss, m = ppo_loss(*args, clip_range=0.2, value_clip_range=0.2, value_coef=0.1, ref_logps=ref, kl_coef=0.5)
    assert float(loss) == pytest.approx(-1.185 + 0.5 * k3_sum, abs=1e-12)
    assert float(loss) == pytest.approx(-0.6419194, abs=1e-7)
    assert float(m["kl"]) == pytest.approx(k3_sum, abs=1e-12)
    assert float(m["policy_loss"]) == pytest.approx(-1.4, abs=1e-12)  # the KL is not part of the policy metric
    # kl_coef 0 with a reference (KL in the reward instead): reported, not in the loss.
    loss, m = ppo_loss(*args, clip_range=0.2, value_clip_range=0.2, value_coef=0.1, ref_logps=ref, kl_coef=0.0)
    assert float(loss) == pytest.approx(-1.185, abs=1e-12)
    assert float(m["kl"]) == pytest.approx(k3_sum, abs=1e-12)


def test_ppo_loss_gradients_at_ratio_one():
    # rho = 1: d policy / d logp = -A_t; d (0.1 * value loss) / dV = 0.1 (V - R) on the plain branch, 0 when clipped.
    logps = t(-0.5, -1.0, -2.0).requires_grad_()
    values = t(*V).requires_grad_()
    adv = t(0.3, -0.7, 1.5)
    loss, _ = ppo_loss(logps, logps.detach(), adv, values, torch.zeros(3, dtype=F64), t(*R), value_coef=0.1)
    loss.backward()
    close(logps.grad, [-0.3, 0.7, -1.5], tol=1e-12)
    close(values.grad, [0.05, 0.0, -0.09], tol=1e-12)
