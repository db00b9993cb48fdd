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


# ============================================================================================ preference
# Every preference loss takes per-sequence SUMMED log-probs (fp32/fp64 tensors of shape (B,)) and returns
# (loss_sum over the B pairs or examples, metrics summed over them); the engine divides by the units of the
# whole optimizer step (pairs for DPO and reward models, examples for KTO).
DPO_LOSSES = ("sigmoid", "robust", "ipo", "hinge", "simpo")


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    simpo_gamma: float = 0.5,
    rpo_alpha: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO family on a batch of B pairs. With the policy/reference log-ratio margin

        h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]

    each pair's loss is, by ``loss_type``:

    - ``sigmoid``: DPO, Rafailov et al. 2023, eq. 7: -log sigma(beta h). With ``label_smoothing`` eps > 0, the
      conservative DPO of Mitchell 2023 ("A note on DPO with noisy preferences"), the expected loss when a
      label is flipped with probability eps: -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).
    - ``robust``: rDPO, Chowdhury et al. 2024 ("Provably robust DPO"), an unbiased loss under label-flip rate eps:
      [-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps).
    - ``ipo``: IPO, Azar et al. 2023 ("A general theoretical paradigm..."), the sampled loss (h - 1/(2 beta))^2, on summed (not length-averaged) log-probs
      as in the paper; TRL's ``ipo`` averages over tokens instead.
    - ``hinge``: SLiC-HF, Zhao et al. 2023, the calibration hinge max(0, delta - h) with margin delta = 1/beta, scaled
      by beta and applied to the reference-normalised margin (as TRL does): max(0, 1 - beta h).
    - ``simpo``: SimPO, Meng et al. 2024, reference-free and length-normalised:
      -log sigma(beta (log pi(y_w|x)/|y_w| - log pi(y_l|x)/|y_l|) - gamma), gamma = ``simpo_gamma``. Needs
      ``chosen_tokens``/``rejected_tokens`` (target tokens per sequence); the reference is never read.

    With ``rpo_alpha`` a > 0, every pair's loss also gets a times the chosen response's mean negative log-likelihood
    per token, -log pi(y_w|x) / |y_w| (RPO: Pang et al. 2024, "Iterative Reasoning Preference Optimization", the
    DPO+NLL loss; TRL's ``rpo_alpha``): DPO alone can widen the margin by pushing both responses down, and the NLL
    term keeps the chosen one likely. Needs ``chosen_tokens``.

    Metrics (sums over the pairs): ``rewards/chosen`` = beta (log pi - log pi_ref) of y_w (for SimPO the
    length-normalised beta log pi), ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracy`` (chosen
    reward above rejected), ``logps/chosen``, ``logps/rejected``, and ``kl`` = the mean of the two policy/
    reference log-ratios (an estimate of KL(pi || pi_ref) on the dataset's responses, not on samples).
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"loss_type: expected one of {', '.join(DPO_LOSSES)}, got {loss_type!r}")
    if loss_type == "simpo":
        assert chosen_tokens is not None and rejected_tokens is not None, "simpo needs token counts"
        chosen_rewards = beta * chosen_logps / chosen_tokens
        rejected_rewards = beta * rejected_logps / rejected_tokens
        losses = -F.logsigmoid(chosen_rewards - rejected_rewards - simpo_gamma)
        kl = None
    else:
        assert ref_chosen_logps is not None and ref_rejected_logps is not None, f"{loss_type} needs reference log-probs"
        chosen_ratio = chosen_logps - ref_chosen_logps
        rejected_ratio = rejected_logps - ref_rejected_logps
        h = chosen_ratio - rejected_ratio
        eps = label_smoothing
        if loss_type == "sigmoid":
            losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
        elif loss_type == "robust":
            losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
        elif loss_type == "ipo":
            losses = (h - 1 / (2 * beta)) ** 2
        else:  # hinge
            losses = torch.relu(1 - beta * h)
        chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
        kl = ((chosen_ratio + rejected_ratio) / 2).detach()
    nll = None
    if rpo_alpha > 0:
        assert chosen_tokens is not None, "rpo_alpha needs chosen_tokens"
        nll = -chosen_logps / chosen_tokens
        losses = losses + rpo_alpha * nll
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().sum(),
        "logps/chosen": chosen_logps.detach().sum(),
        "logps/rejected": rejected_logps.detach().sum(),
    }
    if kl is not None:
        metrics["kl"] = kl.sum()
    if nll is not None:
        metrics["nll/chosen"] = nll.detach().sum()
    return losses.sum(), metrics


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_ref_point: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO, Ethayarajh et al. 2024 ("KTO: Model alignment as prospect theoretic optimization"), on B labelled completions.

    With r = log pi(y|x) - log pi_ref(y|x) and the reference point z0 (``kl_ref_point``, a detached estimate
    of KL(pi || pi_ref) clamped at 0):

        desirable y:   lambda_D (1 - sigma(beta (r - z0)))
        undesirable y: lambda_U (1 - sigma(beta (z0 - r)))

    Metrics (sums): ``rewards/desirable`` and ``rewards/undesirable`` = beta r summed over each label,
    ``count/desirable``/``count/undesirable``, and ``kl`` = z0 x B (so its logged mean is z0).
    """
    ratio = logps - ref_logps
    z0 = kl_ref_point.detach()
    weights = torch.where(desirable, desirable_weight, undesirable_weight).to(ratio.dtype)
    value = torch.where(desirable, torch.sigmoid(beta * (ratio - z0)), torch.sigmoid(beta * (z0 - ratio)))
    losses = weights * (1 - value)
    rewards = (beta * ratio).detach()
    return losses.sum(), {
        "rewards/desirable": rewards[desirable].sum(),
        "rewards/undesirable": rewards[~desirable].sum(),
        "count/desirable": desirable.sum().to(ratio.dtype),
        "count/undesirable": (~desirable).sum().to(ratio.dtype),
        "kl": z0 * ratio.numel(),
    }


def kto_reference_point(kl_logps: torch.Tensor, kl_ref_logps: torch.Tensor) -> torch.Tensor:
    """z0 of KTO (Ethayarajh et al. 2024, sec. 4.1): mean log-ratio on mismatched (x_i, y_j) pairs, clamped
    at 0 and detached (the paper does not backpropagate through it)."""
    return (kl_logps - kl_ref_logps).mean().clamp(min=0).detach()


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_coefficient: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reward-model loss on B pairs: -log sigma(r_w - r_l - m) (Bradley & Terry 1952; Ouyang et al. 2022,
    InstructGPT), with an optional per-pair margin m (Touvron et al. 2023, Llama 2), plus
    ``center_coefficient`` x (r_w + r_l)^2, which keeps rewards centred on zero (Eisenstein et al. 2023).

    Metrics (sums): ``accuracy`` (r_w > r_l), ``margin`` (r_w - r_l), ``rewards/chosen``, ``rewards/rejected``.
    """
    diff = chosen_rewards - rejected_rewards
    losses = -F.logsigmoid(diff - margin if margin is not None else diff)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen_rewards + rejected_rewards) ** 2
    d = diff.detach()
    return losses.sum(), {
        "accuracy": (d > 0).float().sum(),
        "margin": d.sum(),
        "rewards/chosen": chosen_rewards.detach().sum(),
        "rewards/rejected": rejected_rewards.detach().sum(),
    }


# ------------------------------------------------------------------------------------------------ RL
# Token tensors are flat: (N,) for the N completion tokens of a batch in row-major order, with ``seq_index``
# (N,) naming each token's sequence. Per-sequence tensors are (S,). Completions of one prompt (a group of G)
# are consecutive: sequences g*G .. g*G+G-1.

ADVANTAGES = ("grpo", "rloo")


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-relative advantage (Shao et al. 2024, "DeepSeekMath", eq. 3, outcome supervision).

        A_i = (r_i - mean_g(r)) / (std_g(r) + eps)      (scale_std=True; std with Bessel's correction, as TRL)
        A_i =  r_i - mean_g(r)                            (scale_std=False, Liu et al. 2025 "Dr. GRPO")

    Args:
        rewards: (S,) with S = groups x group_size, groups consecutive.
    Returns:
        (S,) advantages; a group whose rewards are all equal gets 0 for every member.
    """
    r = rewards.reshape(-1, group_size).double()
    centred = r - r.mean(dim=1, keepdim=True)
    if scale_std and group_size > 1:
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1).to(rewards.dtype)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): the baseline of each sample is the mean
    reward of the OTHER G-1 samples of its prompt.

        A_i = r_i - 1/(G-1) sum_{j != i} r_j  =  G/(G-1) (r_i - mean_g(r))
    """
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    r = rewards.reshape(-1, group_size).double()
    others = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    return (r - others).reshape(-1).to(rewards.dtype)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate k3 (Schulman 2020, "Approximating KL divergence"), used by GRPO:

        k3 = exp(q - p) - (q - p) - 1,   p = log pi(y_t), q = log pi_ref(y_t)

    Unbiased for KL(pi || pi_ref) under samples from pi, and never negative.
    """
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def clipped_surrogate(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, *, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token (Schulman et al. 2017, eq. 7), as a loss to minimise:

        rho = exp(log pi - log pi_old)
        l_t = -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A)

    clip_high > clip_low is DAPO's "clip-higher" (Yu et al. 2025). Returns (per-token losses, clipped mask).
    """
    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped)


def rollout_is_weights(old_logps: torch.Tensor, behaviour_logps: torch.Tensor, *, mode: str, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance weights for the gap between the engine that sampled a rollout and the trainer (per token):

        rho_t = pi_old(y_t) / q(y_t) = exp(log pi_old(y_t) - log q(y_t))
        truncate:  w_t = min(rho_t, C)                 (truncated IS, "TIS": Yao, Liu et al. 2025, "Your efficient
                                                         RL framework secretly brings you off-policy RL training")
        mask:      w_t = rho_t if rho_t <= C else 0     (masked IS: a token the trainer finds far likelier than the
                                                         sampler did is dropped; IcePop / ms-swift's token_mask)
        none:      w_t = 1

    pi_old is the trainer's policy at sampling time (the same weights the engine had), q the distribution the
    engine actually sampled from: for vLLM its ``processed_logprobs`` (after temperature and top-k/top-p,
    renormalised over the kept tokens), so a top-k/top-p truncation is corrected too (there rho_t <= 1 up to
    numerics: the truncated distribution gave the kept tokens more mass than the policy does). Tokens the
    truncation removed are never sampled, a bias no weight can correct. Multiplies the policy-gradient surrogate
    (TRL and verl apply it the same way; the KL term is not weighted). Returns (weights, the tokens that were
    truncated or masked), both detached."""
    if mode not in ("none", "truncate", "mask"):
        raise ValueError(f"mode: none, truncate or mask, got {mode!r}")
    rho = torch.exp(old_logps.detach() - behaviour_logps.detach())
    if mode == "none":
        return torch.ones_like(rho), torch.zeros_like(rho, dtype=torch.bool)
    over = rho > cap
    return (rho.clamp(max=cap) if mode == "truncate" else rho.masked_fill(over, 0.0)), over


def _per_sequence_norm(token_values: torch.Tensor, seq_index: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """sum_i (1/|o_i|) sum_{t in o_i} v_t: each sequence's token mean, summed over sequences."""
    lengths = torch.bincount(seq_index, minlength=num_seqs).clamp(min=1).to(token_values.dtype)
    return (token_values / lengths[seq_index]).sum()


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    seq_index: torch.Tensor,
    num_seqs: int,
    *,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    norm: str = "token",
    behaviour_logps: torch.Tensor | None = None,
    correction: str = "none",
    correction_cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO objective (Shao et al. 2024, eq. 3) as a summed loss over a batch of completions.

        l_t = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i) + beta k3_t

    with A_i the completion's advantage broadcast to its tokens and k3 the per-token KL to the reference
    (:func:`k3_kl`). Normalisation (``norm``) is the engine's unit:
      - ``token``: sum_i sum_t l_t, divided by the step's completion tokens (DAPO, Yu et al. 2025: long
        completions are not down-weighted);
      - ``sequence``: sum_i (1/|o_i|) sum_t l_t, divided by the step's completions (the GRPO paper).

    Args:
        logps, old_logps: (N,) log-probs of the sampled tokens under the policy (with grad) and the policy that
            sampled them (detached; equal to ``logps.detach()`` on the first update of a rollout).
        advantages: (S,) per completion. seq_index: (N,) in [0, S).
        ref_logps: (N,) reference log-probs, needed when beta > 0.
        behaviour_logps: (N,) log-probs of the distribution the rollout engine sampled from; with ``correction``
            (and ``correction_cap``) the surrogate is weighted by :func:`rollout_is_weights`.
    Metrics (sums over the unit): ``kl`` (k3), ``clip_fraction``, ``ratio``; with behaviour_logps also
    ``rollout/logp_gap`` (|log pi_old - log q|), ``rollout/is_weight`` and ``rollout/is_capped`` (the share of
    tokens truncated or masked).
    """
    adv = advantages[seq_index].to(logps.dtype)
    losses, was_clipped = clipped_surrogate(logps, old_logps, adv, clip_low=clip_low, clip_high=clip_high)
    reduce = (lambda v: v.sum()) if norm == "token" else (lambda v: _per_sequence_norm(v, seq_index, num_seqs))
    extra = {}
    if behaviour_logps is not None:
        weights, capped = rollout_is_weights(old_logps, behaviour_logps, mode=correction, cap=correction_cap)
        losses = losses * weights.to(losses.dtype)
        extra = {"rollout/logp_gap": reduce((old_logps.detach() - behaviour_logps).abs().to(logps.dtype)),
                 "rollout/is_weight": reduce(weights.to(logps.dtype)), "rollout/is_capped": reduce(capped.to(logps.dtype))}
    kl = k3_kl(logps, ref_logps) if ref_logps is not None else torch.zeros_like(logps)
    if beta:
        losses = losses + beta * kl
    return reduce(losses), {
        "kl": reduce(kl.detach()),
        "clip_fraction": reduce(was_clipped.to(logps.dtype)),
        "ratio": reduce(torch.exp(logps - old_logps).detach()),
        **extra,
    }


def whiten(values: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over all elements (std without Bessel's correction); ``shift_mean=False`` keeps the mean
    (as for PPO rewards, whose sign matters to the value function). Ziegler et al. 2019 whiten rewards and advantages."""
    mean, var = values.mean(), values.var(unbiased=False)
    out = (values - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over padded token sequences.

        delta_t = r_t + gamma V_{t+1} - V_t,   A_t = sum_l (gamma lam)^l delta_{t+l},   returns_t = A_t + V_t

    The value after a sequence's last token is 0 (the episode ends with the completion).

    Args:
        rewards, values: (S, L) per completion token; mask: (S, L) bool, True on real tokens (a prefix of each row).
    Returns:
        advantages (S, L) and returns (S, L), zero on padding.
    """
    m = mask.to(values.dtype)
    values = values * m
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * m


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, *, clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss per token (as in Ziegler et al. 2019's implementation):

        l_t = 1/2 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)

    Returns (per-token losses, clipped mask)."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    plain_err, clipped_err = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * torch.maximum(plain_err, clipped_err), clipped_err > plain_err


def ppo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    *,
    clip_range: float = 0.2,
    value_clip_range: float = 0.2,
    value_coef: float = 0.1,
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    behaviour_logps: torch.Tensor | None = None,
    correction: str = "none",
    correction_cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO with a value head (Schulman et al. 2017; Ouyang et al. 2022), summed over completion tokens:

        l_t = -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t) + value_coef l^V_t [+ kl_coef k3_t]

    A_t from :func:`gae` (already whitened by the caller if wanted), l^V from :func:`value_loss`. The KL is either
    in the reward (the caller subtracted kl_coef (log pi_old - log pi_ref) per token before GAE; pass
    kl_coef=0 here) or a loss term (k3, as GRPO). All inputs (N,) per completion token. ``behaviour_logps`` and
    ``correction``: the policy term is weighted by :func:`rollout_is_weights`, as in :func:`grpo_loss`.
    Metrics (sums): ``policy_loss``, ``value_loss``, ``clip_fraction``, ``value_clip_fraction``, ``kl`` (and the
    ``rollout/*`` metrics of :func:`grpo_loss` with behaviour_logps).
    """
    policy, was_clipped = clipped_surrogate(logps, old_logps, advantages, clip_low=clip_range, clip_high=clip_range)
    extra = {}
    if behaviour_logps is not None:
        weights, capped = rollout_is_weights(old_logps, behaviour_logps, mode=correction, cap=correction_cap)
        policy = policy * weights.to(policy.dtype)
        extra = {"rollout/logp_gap": (old_logps.detach() - behaviour_logps).abs().to(logps.dtype).sum(),
                 "rollout/is_weight": weights.to(logps.dtype).sum(), "rollout/is_capped": capped.to(logps.dtype).sum()}
    vloss, v_clipped = value_loss(values, old_values, returns, clip_range=value_clip_range)
    losses = policy + value_coef * vloss
    kl = k3_kl(logps, ref_logps) if ref_logps is not None else torch.zeros_like(logps)
    if kl_coef:
        losses = losses + kl_coef * kl
    return losses.sum(), {
        "policy_loss": policy.detach().sum(),
        "value_loss": vloss.detach().sum(),
        "clip_fraction": was_clipped.to(logps.dtype).sum(),
        "value_clip_fraction": v_clipped.to(logps.dtype).sum(),
        "kl": kl.detach().sum(),
        **extra,
    }
