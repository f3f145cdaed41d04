"""Advantages for GRPO (group-normalised) and RAFT++ (accept = 1, reject = 0).

All functions are vectorised over samples: groups are handled with ``torch.unique`` +
``index_add_`` / ``scatter_reduce_``, never a Python loop over groups, because GVM allocation
(ALGORITHMS.md §GVM) gives every prompt a different group size.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "grpo_advantages",
    "zero_variance_groups",
    "raft_plus_plus_advantages",
    "raft_plus_plus_keep_mask",
]


def _group_stats(rewards: Tensor, group_index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample (group size, group mean, group sum of squared deviations, all-equal flag), in float64.

    float64 because the mean/deviation of a few 0/1 rewards must be exact enough that the
    ``std + ε`` division with ε = 1e-6 does not amplify rounding noise.
    """
    if rewards.dim() != 1 or group_index.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_index must both be [N], got {tuple(rewards.shape)} and {tuple(group_index.shape)}"
        )
    r = rewards.to(torch.float64)
    # Group ids may be arbitrary (e.g. prompt ids) and unsorted: map them to 0..G-1.
    _, inverse = torch.unique(group_index, return_inverse=True)
    num_groups = int(inverse.max().item()) + 1 if inverse.numel() else 0
    zeros = torch.zeros(num_groups, dtype=torch.float64, device=r.device)
    size = zeros.index_add(0, inverse, torch.ones_like(r))
    mean = zeros.index_add(0, inverse, r) / size
    sq_dev = zeros.index_add(0, inverse, (r - mean[inverse]) ** 2)
    gmin = torch.full_like(zeros, float("inf")).scatter_reduce(0, inverse, r, reduce="amin")
    gmax = torch.full_like(zeros, float("-inf")).scatter_reduce(0, inverse, r, reduce="amax")
    all_equal = gmin == gmax
    return size[inverse], mean[inverse], sq_dev[inverse], all_equal[inverse]


def grpo_advantages(
    rewards: Tensor,
    group_index: Tensor,
    epsilon: float = 1e-6,
    scale_rewards: bool = True,
) -> Tensor:
    """Group-relative advantages, ALGORITHMS.md §GRPO.2 (and §GVM.7 for groups of one).

    ``A_ij = (r_ij − mean_j r_ij) / (std_j r_ij + ε)`` with Bessel's correction (n − 1) in the std.

    * ``scale_rewards=False`` (Dr. GRPO): ``A_ij = r_ij − mean_j r_ij``.
    * Groups of size 1 follow the GVM code (verl), §GVM.7: mean 0 and std 1, so
      ``A = r / (1 + ε)`` (``A = r`` without scaling). Skipping such prompts is the caller's option.
    * A group of size ≥ 2 whose rewards are all equal gets exactly ``A = 0`` (§GRPO.2), not the
      ±1e-11 rounding residue that ``(r − mean) / ε`` could leave.
    * A group whose std overflows float64 gets NaN, not 0: the learner skips a non-finite update.

    Args:
        rewards: [N] float rewards.
        group_index: [N] integer id of the prompt each sample belongs to; groups may have different
            sizes and need not be contiguous or sorted.
        epsilon: ε in the denominator (default 1e-6 as in verl; TRL hard-codes 1e-4).
        scale_rewards: divide by ``std + ε`` (True) or not (False).

    Returns:
        [N] advantages in ``rewards``' dtype (float32 if rewards are not floating point).
    """
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    if rewards.numel() == 0:
        return torch.zeros(0, dtype=out_dtype, device=rewards.device)
    size, mean, sq_dev, all_equal = _group_stats(rewards, group_index)
    singleton = size == 1
    mean = torch.where(singleton, torch.zeros_like(mean), mean)
    centred = rewards.to(torch.float64) - mean
    if scale_rewards:
        std = torch.sqrt(sq_dev / (size - 1).clamp(min=1))
        std = torch.where(singleton, torch.ones_like(std), std)
        # Rewards past ~1e154 overflow the squared deviations: std = inf would give every sample A = 0,
        # an update that silently learns nothing. NaN instead, which the learner skips and counts.
        std = torch.where(torch.isfinite(std), std, torch.full_like(std, float("nan")))
        advantages = centred / (std + epsilon)
    else:
        advantages = centred
    advantages = torch.where(all_equal & ~singleton, torch.zeros_like(advantages), advantages)
    return advantages.to(out_dtype)


def zero_variance_groups(rewards: Tensor, group_index: Tensor) -> Tensor:
    """bool [N]: the sample's group has ≥ 2 members and all-equal rewards (ALGORITHMS.md §GRPO.2).

    Such groups have A = 0 and contribute no policy gradient; the option
    ``filter_zero_variance_groups`` drops them (DAPO dynamic sampling) and reports how many.
    """
    if rewards.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=rewards.device)
    size, _, _, all_equal = _group_stats(rewards, group_index)
    return all_equal & (size >= 2)


def raft_plus_plus_advantages(rewards: Tensor, accept_threshold: float = 1.0) -> Tensor:
    """RAFT++ advantages, ALGORITHMS.md §RAFT: ``A = 1`` for an accepted sample, else ``A = 0``.

    Accepted is ``r >= accept_threshold`` (`rl_service.algorithms.acceptance`; 1.0: the verifier
    says correct). Used with :func:`rl_service.algorithms.policy_loss.policy_loss` (§GRPO steps 3–6, token-mean).
    Returned in ``rewards``' floating dtype (float32 for integer/bool rewards).
    """
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return (rewards >= accept_threshold).to(out_dtype)


def raft_plus_plus_keep_mask(rewards: Tensor, drop_rejected: bool = False, accept_threshold: float = 1.0) -> Tensor:
    """bool [N]: which samples enter the RAFT++ loss, ALGORITHMS.md §RAFT.

    The GVM code keeps rejected samples (A = 0): they stay in the token-mean denominator and in the
    KL term, so the default keeps everything. ``drop_rejected=True`` (ours) keeps only accepted
    samples; the caller removes the others from the batch (or zeroes their completion mask) *before*
    computing ``loss_normalizer_for`` (policy_loss.py), so the denominator counts only kept tokens.
    """
    if drop_rejected:
        return rewards >= accept_threshold
    return torch.ones_like(rewards, dtype=torch.bool)


def raft_expected_count_scale(accepted_mask: Tensor, group_index: Tensor, eligible: Tensor,
                              acceptance_estimate: Tensor) -> Tensor:
    r"""float64 [N]: per-sample factor ``a_i / (n_i p̄_i)`` that turns RAFT++'s per-prompt mean over
    accepted samples into the estimator whose variance §GVM.2 states (ALGORITHMS.md §GVM.2, §RAFT).

    The EM gradient of prompt i is ``∇ log P(accept | x_i) = E[1[acc] ∇log π] / p_i``. Its unbiased
    Monte-Carlo estimate from ``n_i`` samples divides the accepted samples' sum by the *expected*
    accepted count ``n_i p_i``, not by the observed one ``a_i``:

    $$ \hat g_i = \frac{1}{n_i \bar p_i} \sum_{j \le n_i} 1[\text{acc}_{ij}]\, \nabla \log\pi(y_{ij}|x_i),
       \qquad \operatorname{Var}\hat g_i \approx \frac{G_i^2}{n_i p_i} \ (\bar p_i = p_i), $$

    which is exactly the variance §GVM.2 minimises, and whose expectation ``(p_i / p̄_i) μ_i`` does not
    depend on ``n_i``: allocations then differ in noise only. The observed-count mean is 0 when no
    sample is accepted and ``μ_i`` otherwise, so its expectation ``(1 − (1 − p_i)^{n_i}) μ_i`` grows with
    ``n_i`` and its variance has a term ``(1 − p_i)^{n_i}`` that G²/(n p) leaves out. ``p̄_i`` must not
    come from the same samples (then the factor is 1): the statistics role's estimate from earlier
    visits or a pilot. A prompt with ``p̄_i = 0`` (never seen accepted) gets factor 0, as GVM gives it
    weight 0 (§GVM.4); one with ``p̄_i`` NaN (no estimate yet: a prompt never seen) keeps the observed
    count (factor 1).

    Args:
        accepted_mask: bool [N], sample accepted.
        group_index: long [N], the sample's prompt (0 … B−1).
        eligible: bool [N], the sample counts in n_i (not removed by dynamic sampling / singleton rules).
        acceptance_estimate: [B] p̄ per prompt, in [0, 1], or NaN for none.
    """
    estimate = acceptance_estimate.to(torch.float64)
    known = ~torch.isnan(estimate)
    if estimate.ndim != 1 or bool(((estimate[known] < 0) | (estimate[known] > 1)).any()):
        raise ValueError("acceptance_estimate must be a 1-D tensor of values in [0, 1] (NaN: no estimate)")
    if group_index.numel() and int(group_index.max()) >= estimate.numel():
        raise ValueError(f"acceptance_estimate has {estimate.numel()} prompts, the samples name prompt "
                         f"{int(group_index.max())}")
    size = estimate.numel()
    n = torch.zeros(size, dtype=torch.float64).index_add_(0, group_index, eligible.to(torch.float64))
    a = torch.zeros(size, dtype=torch.float64).index_add_(0, group_index, (eligible & accepted_mask).to(torch.float64))
    expected = torch.where(known, n * estimate, a)
    scale = torch.where(expected > 0, a / expected.clamp(min=1e-300), torch.zeros_like(a))
    return scale[group_index]
