r"""Preference losses: DPO (ALGORITHMS.md §DPO) and BVPO (§BVPO.3–6).

DPO, per pair (chosen y_w, rejected y_l) of the same prompt, with summed completion log-probs:

$$
h = \beta\Big[\big(\log\pi_\theta(y_w|x) - \log\pi_{\text{ref}}(y_w|x)\big)
            - \big(\log\pi_\theta(y_l|x) - \log\pi_{\text{ref}}(y_l|x)\big)\Big], \qquad
\mathcal{L}_{\text{DPO}} = -\log\sigma(h) = \operatorname{softplus}(-h)
$$

averaged over the batch (TRL's ``sigmoid`` loss). BVPO mixes two estimators of the gradient of the
DPO loss of the answer marginal π(y|x) = Σ_r π(r, y|x) (§BVPO.1–3): the trace loss L_t on the joint
log-likelihood log π(r, y|x) of reasoning-on responses, and the empty-trace loss L_e on
log π(∅, y|x) of reasoning-off responses:

$$
\mathcal{L} = \alpha\,\mathcal{L}_t + (1-\alpha)\,\mathcal{L}_e, \qquad g_c = \alpha g_t + (1-\alpha) g_e,
\qquad \operatorname{Var}(g_c) = \alpha^2 \operatorname{Var}(g_t)\ \ (\text{§BVPO.4})
$$

The MSE-optimal α (§BVPO.5), with biases b = E g − g_true and covariances Σ:

$$
\alpha^* = \operatorname{clip}_{[0,1]}
\frac{\operatorname{tr}\Sigma_e - \operatorname{tr}\Sigma_{te} + \|b_e\|^2 - b_t^\top b_e}
     {\operatorname{tr}(\Sigma_t + \Sigma_e - 2\Sigma_{te}) + \|b_t - b_e\|^2}
$$

whose denominator is E‖g_t − g_e‖². :class:`OnlineAlphaEstimator` is the §BVPO.6 online estimate
α̂ = ‖b̂_e‖² / (tr Σ̂_t + ‖b̂_e‖²) (assumes b_t ≈ 0, Σ_e = Σ_te = 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PreferenceLogps", "dpo_loss", "dpo_pair_losses", "bvpo_loss", "bvpo_per_term_loss", "per_term_alpha",
           "per_term_trains",
           "optimal_alpha", "optimal_alpha_from_moments", "OnlineAlphaEstimator"]

# A denominator E‖g_t − g_e‖² at or below this fraction of the moments' scale is "0" (§BVPO.5: the
# estimators agree, any α is optimal); it absorbs the rounding of tr Σ_t + tr Σ_e − 2 tr Σ_te.
_RELATIVE_ZERO = 1e-12


@dataclass
class PreferenceLogps:
    """Summed completion log-probs of a batch of preference pairs in one mode (trace or empty trace).

    Attributes:
        policy_chosen_logps: [B] log π_θ(y_w|x) (carries the gradient; for the trace mode the joint
            log π_θ(r_w, y_w|x), for the empty mode log π_θ(∅, y_w|x)).
        policy_rejected_logps: [B] the same for the rejected responses.
        ref_chosen_logps: [B] log π_ref of the chosen responses (constant; detached in the loss).
        ref_rejected_logps: [B] log π_ref of the rejected responses.
    """

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    ref_chosen_logps: Tensor
    ref_rejected_logps: Tensor


def _check_beta(beta: float) -> None:
    if not (math.isfinite(beta) and beta > 0.0):   # β = inf: h = inf · 0 = NaN for equal log-ratios
        raise ValueError(f"beta must be finite and > 0, got {beta}")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, dict[str, float]]:
    """Sigmoid DPO loss ``mean_i softplus(−h_i)`` (ALGORITHMS.md §DPO); equals TRL's ``sigmoid`` loss.

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] summed log π_θ of the chosen / rejected
            completions (carry the gradient).
        ref_chosen_logps, ref_rejected_logps: [B] summed log π_ref (cached; detached here).
        beta: β > 0 and finite, the KL-regularisation strength (default 0.1).

    Returns:
        ``(loss, metrics)``; metrics are python floats, as TRL logs them: ``rewards_chosen`` and
        ``rewards_rejected`` (batch means of β(log π_θ − log π_ref)), ``rewards_margin`` (mean of
        their difference = mean h), ``rewards_accuracy`` (fraction with chosen reward > rejected
        reward), ``logps_chosen``, ``logps_rejected`` and ``loss``.
    """
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    shapes = {tuple(t.shape) for t in logps}
    if len(shapes) != 1 or policy_chosen_logps.dim() != 1 or policy_chosen_logps.numel() == 0:
        raise ValueError(f"the four log-prob tensors must all be [B] with B >= 1, got shapes {sorted(shapes)}")
    _check_beta(beta)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps.detach()
    rejected_logratios = policy_rejected_logps - ref_rejected_logps.detach()
    h = beta * (chosen_logratios - rejected_logratios)
    loss = F.softplus(-h).mean()

    with torch.no_grad():
        chosen_rewards = beta * chosen_logratios
        rejected_rewards = beta * rejected_logratios
        metrics = {
            "rewards_chosen": float(chosen_rewards.mean().item()),
            "rewards_rejected": float(rejected_rewards.mean().item()),
            "rewards_margin": float((chosen_rewards - rejected_rewards).mean().item()),
            "rewards_accuracy": float((chosen_rewards > rejected_rewards).float().mean().item()),
            "logps_chosen": float(policy_chosen_logps.mean().item()),
            "logps_rejected": float(policy_rejected_logps.mean().item()),
            "loss": float(loss.item()),
        }
    return loss, metrics


def bvpo_loss(
    trace: PreferenceLogps, empty: PreferenceLogps, alpha: float, beta: float = 0.1
) -> tuple[Tensor, dict[str, float]]:
    """BVPO mixed loss ``L = α L_t + (1 − α) L_e`` (ALGORITHMS.md §BVPO.3), each term a §DPO loss.

    Both modes are for the same prompts in the same step (their batch sizes may differ: each mode's
    pairs are ranked separately). The gradient is exactly α g_t + (1 − α) g_e, so when the
    empty-trace responses are fixed the variance over trace sampling is α² Var(g_t) (§BVPO.4).

    Args:
        trace: log-probs of the reasoning-on pairs (joint log π(r, y|x)).
        empty: log-probs of the reasoning-off pairs (log π(∅, y|x)).
        alpha: α ∈ [0, 1], weight of the trace loss (paper default 0.5; or an
            :class:`OnlineAlphaEstimator` value).
        beta: DPO β of both terms.

    Returns:
        ``(loss, metrics)``: :func:`dpo_loss` metrics prefixed ``trace_`` and ``empty_``, plus
        ``alpha`` and ``loss``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    trace_loss, trace_metrics = dpo_loss(trace.policy_chosen_logps, trace.policy_rejected_logps,
                                         trace.ref_chosen_logps, trace.ref_rejected_logps, beta)
    empty_loss, empty_metrics = dpo_loss(empty.policy_chosen_logps, empty.policy_rejected_logps,
                                         empty.ref_chosen_logps, empty.ref_rejected_logps, beta)
    # α = 1 (0) is L_t (L_e) alone: a term of weight 0 is left out, as 0 · inf (a −inf log-prob) is NaN.
    if alpha in (0.0, 1.0):
        loss = trace_loss if alpha == 1.0 else empty_loss
    else:
        loss = alpha * trace_loss + (1.0 - alpha) * empty_loss
    metrics = {f"trace_{k}": v for k, v in trace_metrics.items()}
    metrics.update({f"empty_{k}": v for k, v in empty_metrics.items()})
    metrics["alpha"] = float(alpha)
    metrics["loss"] = float(loss.detach().item())
    return loss, metrics


def dpo_pair_losses(logps: PreferenceLogps, beta: float = 0.1) -> Tensor:
    """[B] per-pair sigmoid DPO losses softplus(−h_i) (§DPO); B may be 0 (a term with no pair)."""
    _check_beta(beta)
    chosen = logps.policy_chosen_logps - logps.ref_chosen_logps.detach()
    rejected = logps.policy_rejected_logps - logps.ref_rejected_logps.detach()
    return F.softplus(-beta * (chosen - rejected))


def per_term_alpha(alpha: float, trace_pairs: int, empty_pairs: int) -> float:
    """The weight ``per_term`` really gives the trace term: α, or 1 / 0 when the step has no
    empty-trace / trace pair (that term is absent, so the other carries the whole loss). α = 0 or 1
    asks for one term only, so the other never stands in for it: a ValueError when the term asked
    for has no pair (as when the step has none at all; see :func:`per_term_trains`)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not per_term_trains(alpha, trace_pairs, empty_pairs):
        raise ValueError(f"no pair to train at alpha {alpha}: {trace_pairs} trace and {empty_pairs} empty-trace pairs")
    if alpha in (0.0, 1.0):
        return float(alpha)
    return 1.0 if empty_pairs == 0 else 0.0 if trace_pairs == 0 else float(alpha)


def per_term_trains(alpha: float, trace_pairs: int, empty_pairs: int) -> bool:
    """Whether a ``per_term`` step has a pair in a term of non-zero weight."""
    if trace_pairs < 0 or empty_pairs < 0:
        raise ValueError(f"pair counts must be >= 0, got {trace_pairs} and {empty_pairs}")
    return (alpha > 0.0 and trace_pairs > 0) or (alpha < 1.0 and empty_pairs > 0)


def bvpo_per_term_loss(trace: PreferenceLogps, empty: PreferenceLogps, alpha: float, beta: float = 0.1,
                       trace_pairs: int | None = None, empty_pairs: int | None = None) -> Tensor:
    """``per_term`` BVPO (ALGORITHMS.md §BVPO.3): ``L = α L̄_t + (1 − α) L̄_e``, each term the mean
    over ITS OWN pairs, so a prompt with a pair in one mode only still trains that term.

    The tensors may hold a slice (micro-batch) of the step's pairs, either side possibly empty:
    ``trace_pairs`` / ``empty_pairs`` are the step's totals N_t, N_e (default: the sizes given), and
    this returns the slice's share ``α_eff Σ_slice ℓ_t / N_t + (1 − α_eff) Σ_slice ℓ_e / N_e``; the
    shares of all slices add up to L. α_eff is :func:`per_term_alpha` (1 or 0 when one term has no
    pair in the whole step). With one pair per mode per prompt on the same prompts (N_t = N_e) this
    is exactly :func:`bvpo_loss`.
    """
    trace_pairs = trace.policy_chosen_logps.numel() if trace_pairs is None else trace_pairs
    empty_pairs = empty.policy_chosen_logps.numel() if empty_pairs is None else empty_pairs
    alpha_eff = per_term_alpha(alpha, trace_pairs, empty_pairs)
    trace_losses, empty_losses = dpo_pair_losses(trace, beta), dpo_pair_losses(empty, beta)
    if trace_losses.numel() > trace_pairs or empty_losses.numel() > empty_pairs:
        raise ValueError(f"a slice of {trace_losses.numel()} trace / {empty_losses.numel()} empty pairs exceeds the step's "
                         f"totals {trace_pairs} / {empty_pairs}")
    # A term absent from the step (N = 0) or weighted 0 is left out: 0 · NaN would be NaN.
    trace_share = alpha_eff * trace_losses.sum() / trace_pairs if trace_pairs and alpha_eff > 0.0 else None
    empty_share = (1.0 - alpha_eff) * empty_losses.sum() / empty_pairs if empty_pairs and alpha_eff < 1.0 else None
    if trace_share is None:
        return empty_share
    return trace_share if empty_share is None else trace_share + empty_share


def optimal_alpha_from_moments(
    tr_sigma_t: float, tr_sigma_e: float, tr_sigma_te: float, b_t: Tensor, b_e: Tensor
) -> float:
    """MSE-optimal mixing weight α* from the estimators' moments (ALGORITHMS.md §BVPO.5).

    ``α_unc = [tr Σ_e − tr Σ_te + ‖b_e‖² − b_tᵀb_e] / [tr(Σ_t + Σ_e − 2Σ_te) + ‖b_t − b_e‖²]``,
    returned clipped to [0, 1]; 0.5 when the denominator E‖g_t − g_e‖² is 0 (up to rounding: at most
    1e-12 of the moments' scale), where every α has the same MSE.

    Args:
        tr_sigma_t, tr_sigma_e: tr Cov(g_t), tr Cov(g_e).
        tr_sigma_te: tr Cov(g_t, g_e) = Σ_k Cov(g_t[k], g_e[k]).
        b_t, b_e: [P] biases E g_t − g_true and E g_e − g_true.
    """
    b_t = torch.as_tensor(b_t, dtype=torch.float64).flatten()
    b_e = torch.as_tensor(b_e, dtype=torch.float64).flatten()
    if b_t.shape != b_e.shape:
        raise ValueError(f"b_t and b_e must have the same size, got {tuple(b_t.shape)} and {tuple(b_e.shape)}")
    numerator = tr_sigma_e - tr_sigma_te + float(b_e @ b_e) - float(b_t @ b_e)
    denominator = tr_sigma_t + tr_sigma_e - 2.0 * tr_sigma_te + float((b_t - b_e) @ (b_t - b_e))
    scale = abs(tr_sigma_t) + abs(tr_sigma_e) + float(b_t @ b_t) + float(b_e @ b_e)
    if not all(math.isfinite(v) for v in (numerator, denominator, scale)):
        raise ValueError("moments must be finite")
    if denominator <= _RELATIVE_ZERO * scale:
        return 0.5
    return min(max(numerator / denominator, 0.0), 1.0)


def optimal_alpha(g_t_samples: Tensor, g_e_samples: Tensor, g_true: Tensor) -> float:
    """α* of §BVPO.5 from paired samples of the two estimators; exactly the α ∈ [0, 1] minimising
    the empirical ``MSE(α) = mean_n ‖α g_t[n] + (1 − α) g_e[n] − g_true‖²``.

    The moments are the plug-in (1/N) ones, so the closed form is that empirical minimiser (an
    unbiased 1/(N − 1) covariance would not be).

    Args:
        g_t_samples: [N, P] trace-estimator gradients, one row per resample, columns = coordinates.
        g_e_samples: [N, P] empty-trace gradients paired with the rows of ``g_t_samples`` (identical
            rows when g_e has zero variance; a [P] vector is broadcast to all rows).
        g_true: [P] true gradient.
    """
    g_t = g_t_samples.detach().to(torch.float64)
    g_e = g_e_samples.detach().to(torch.float64)
    if g_e.dim() == 1:
        g_e = g_e.unsqueeze(0).expand_as(g_t)
    g = g_true.detach().to(torch.float64).flatten()
    if g_t.dim() != 2 or g_t.shape != g_e.shape or g_t.shape[1] != g.numel() or g_t.shape[0] == 0:
        raise ValueError(f"need g_t_samples [N, P], g_e_samples [N, P] and g_true [P]; got {tuple(g_t_samples.shape)}, "
                         f"{tuple(g_e_samples.shape)}, {tuple(g_true.shape)}")
    mean_t, mean_e = g_t.mean(0), g_e.mean(0)
    centred_t, centred_e = g_t - mean_t, g_e - mean_e
    tr_sigma_t = float((centred_t * centred_t).sum(1).mean())
    tr_sigma_e = float((centred_e * centred_e).sum(1).mean())
    tr_sigma_te = float((centred_t * centred_e).sum(1).mean())
    return optimal_alpha_from_moments(tr_sigma_t, tr_sigma_e, tr_sigma_te, mean_t - g, mean_e - g)


class OnlineAlphaEstimator:
    r"""Online α̂ from trace resamples (ALGORITHMS.md §BVPO.6, ours).

    Per update, with K ≥ 2 per-resample trace gradients g_t[k] and the empty-trace gradient g_e on
    a cheap parameter subset (flattened) — shown for one prompt; :meth:`update` pools the prompts of
    a batch, each resampled on its own (§BVPO.6: "per prompt"):

    $$
    \bar g_t = \tfrac1K\sum_k g_t[k], \qquad
    \operatorname{tr}\hat\Sigma_t = \sum_p \tfrac{1}{K-1}\sum_k \big(g_t[k]_p - \bar g_{t,p}\big)^2, \qquad
    \|\hat b_e\|^2 = \max\big(\|g_e - \bar g_t\|^2 - \operatorname{tr}\hat\Sigma_t / K,\ 0\big)
    $$

    (E‖g_e − ḡ_t‖² = ‖b_e − b_t‖² + tr Σ_t / K, hence the correction). Numerator ‖b̂_e‖² and
    denominator tr Σ̂_t + ‖b̂_e‖² are smoothed by EMAs, ``ema ← λ·ema + (1 − λ)·new`` (the first
    update initialises them), and α̂ = clip(num / den, α_min, α_max); 0.5 (clipped likewise) before
    the first update and while den = 0. With b_t ≈ 0 this targets α_unc = ‖b_e‖² / (tr Σ_t + ‖b_e‖²)
    (§BVPO.6; with b_t ≠ 0 it targets ‖b_e − b_t‖² in place of ‖b_e‖²).

    Args:
        ema_decay: λ ∈ [0, 1), weight of the past (0 = no smoothing).
        alpha_min, alpha_max: clip range, 0 ≤ α_min ≤ α_max ≤ 1.
    """

    def __init__(self, ema_decay: float = 0.9, alpha_min: float = 0.0, alpha_max: float = 1.0) -> None:
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if not 0.0 <= alpha_min <= alpha_max <= 1.0:
            raise ValueError(f"need 0 <= alpha_min <= alpha_max <= 1, got {alpha_min}, {alpha_max}")
        self.ema_decay = float(ema_decay)
        self.alpha_min = float(alpha_min)
        self.alpha_max = float(alpha_max)
        self.ema_numerator = 0.0
        self.ema_denominator = 0.0
        self.num_updates = 0
        self.bias_sq = 0.0  # ‖b̂_e‖² of the latest update (before smoothing)
        self.trace_variance = 0.0  # tr Σ̂_t of the latest update (before smoothing)

    @property
    def alpha(self) -> float:
        """Current α̂ = clip(EMA num / EMA den, α_min, α_max) (0.5, clipped, when den is 0)."""
        raw = self.ema_numerator / self.ema_denominator if self.ema_denominator > 0.0 else 0.5
        return min(max(raw, self.alpha_min), self.alpha_max)

    @torch.no_grad()
    def update(self, trace_grads: Tensor, empty_grad: Tensor) -> float:
        """Add one step's estimate; returns the new α̂. ``empty_grad`` [P] is the batch's g_e.

        ``trace_grads`` is either [K, P], K ≥ 2 resamples of the batch trace gradient, or — per
        prompt, as §BVPO.6 asks — [B, K, P]: K resampled pairs of each of the B prompts, row
        ``[i, k]`` the gradient of prompt i's k-th resampled pair alone. The batch gradient is the
        mean over prompts of one pair each, and prompts are sampled independently, so its variance
        is ``tr Σ̂_t = (1/B²) Σ_i tr Σ̂_t^{(i)}`` with each prompt's unbiased (K − 1) sample
        variance, and ``ḡ_t`` (mean over i and k) has variance tr Σ̂_t / K. That pools B·(K − 1)
        degrees of freedom where the [K, P] batch form has K − 1 (same expectation, far less noise),
        and is identical to it when B = 1.
        """
        if trace_grads.dim() == 2:
            trace_grads = trace_grads.unsqueeze(0)
        if trace_grads.dim() != 3 or trace_grads.shape[0] < 1 or trace_grads.shape[1] < 2:
            raise ValueError(f"trace_grads must be [K, P] or [B, K, P] with K >= 2 resamples, got {tuple(trace_grads.shape)}")
        if empty_grad.dim() != 1 or empty_grad.shape[0] != trace_grads.shape[2]:
            raise ValueError(f"empty_grad must be [P] = [{trace_grads.shape[2]}], got {tuple(empty_grad.shape)}")
        g_t = trace_grads.detach().to(torch.float64)
        g_e = empty_grad.detach().to(torch.float64)
        if not (torch.isfinite(g_t).all() and torch.isfinite(g_e).all()):
            raise ValueError("gradients must be finite")
        num_prompts, num_resamples = g_t.shape[0], g_t.shape[1]
        trace_variance = float(g_t.var(dim=1, unbiased=True).sum()) / num_prompts**2
        gap = g_e - g_t.mean(dim=(0, 1))
        bias_sq = max(float(gap @ gap) - trace_variance / num_resamples, 0.0)

        self.bias_sq, self.trace_variance = bias_sq, trace_variance
        numerator, denominator = bias_sq, trace_variance + bias_sq
        if self.num_updates == 0:
            self.ema_numerator, self.ema_denominator = numerator, denominator
        else:
            lam = self.ema_decay
            self.ema_numerator = lam * self.ema_numerator + (1.0 - lam) * numerator
            self.ema_denominator = lam * self.ema_denominator + (1.0 - lam) * denominator
        self.num_updates += 1
        return self.alpha

    def metrics(self) -> dict[str, float]:
        """Per-step log entries (§BVPO.6: log α̂ every step)."""
        return {"bvpo_alpha": self.alpha, "bvpo_bias_sq": self.bias_sq, "bvpo_trace_variance": self.trace_variance}

    def state_dict(self) -> dict[str, float]:
        return {"ema_numerator": self.ema_numerator, "ema_denominator": self.ema_denominator,
                "num_updates": float(self.num_updates), "bias_sq": self.bias_sq, "trace_variance": self.trace_variance}

    def load_state_dict(self, state: dict[str, float]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"state keys must be {sorted(expected)}, got {sorted(state)}")
        self.ema_numerator = float(state["ema_numerator"])
        self.ema_denominator = float(state["ema_denominator"])
        self.num_updates = int(state["num_updates"])
        self.bias_sq = float(state["bias_sq"])
        self.trace_variance = float(state["trace_variance"])
