"""Pure helpers of `benchmarks/gvm_variance.py`: covariance traces of gradient estimators, and the
per-sample coefficients that write each estimator as a sum over samples (no Ray, no model).

Every policy-gradient estimator measured there is linear in per-sample gradients: at ratio 1 (one
update per batch, §GRPO.6) and with no KL term, the learner's loss −Σ_j A_j Σ_t ρ_jt / Z has the
gradient g = Σ_j c_j v_j with v_j = ∇_θ Σ_t log π_θ(y_jt | ·) and c_j = −A_j / Z. So a draw is fully
described by its coefficient vector c over a pool of samples, and with the pool's Gram matrix
K = V Vᵀ every squared norm is a quadratic form: ‖Σ_j c_j v_j‖² = cᵀ K c.
"""
from __future__ import annotations

import numpy as np
import torch

from rl_service.algorithms.advantages import grpo_advantages

ESTIMATORS = ("grpo_token_mean", "raft_token_mean", "grpo_prompt_mean", "raft_prompt_mean", "raft_accepted_mean")


def covariance_trace(draws) -> float:
    """tr Ĉov of R draws of a vector estimator ([R, D], R ≥ 2): (1/(R−1)) Σ_r ‖g_r − ḡ‖², in float64."""
    g = torch.as_tensor(draws, dtype=torch.float64)
    if g.dim() != 2 or g.shape[0] < 2:
        raise ValueError(f"need [R, D] draws with R >= 2, got shape {tuple(g.shape)}")
    return float((g - g.mean(dim=0)).square().sum() / (g.shape[0] - 1))


def gram_covariance_trace(gram) -> float:
    """The same trace from the draws' Gram matrix K_rs = ⟨g_r, g_s⟩ ([R, R]): (tr K − 1ᵀK1 / R) / (R − 1)."""
    k = np.asarray(gram, dtype=np.float64)
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] < 2:
        raise ValueError(f"need a square [R, R] Gram matrix with R >= 2, got shape {k.shape}")
    r = k.shape[0]
    return float((np.trace(k) - k.sum() / r) / (r - 1))


def gram_mean_sq_norm(gram) -> float:
    """Unbiased ‖E g‖² from the draws' Gram matrix: ‖ḡ‖² − tr Ĉov / R (ḡ's own noise removed)."""
    k = np.asarray(gram, dtype=np.float64)
    r = k.shape[0]
    return float(k.sum() / r**2 - gram_covariance_trace(k) / r)


def coefficient_moments(coefficients, gram) -> tuple[float, float, np.ndarray]:
    """(tr Ĉov, unbiased ‖E g‖², per-draw ‖g_r − ḡ‖²) of draws g_r = Σ_j C[r, j] v_j given K = V Vᵀ.

    `coefficients` [R, M] (R ≥ 2), `gram` [M, M] symmetric positive semi-definite."""
    c = np.asarray(coefficients, dtype=np.float64)
    k = np.asarray(gram, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] < 2 or k.shape != (c.shape[1], c.shape[1]):
        raise ValueError(f"need coefficients [R >= 2, M] and gram [M, M]; got {c.shape} and {k.shape}")
    r = c.shape[0]
    mean = c.mean(axis=0)
    centred = c - mean
    deviations = ((centred @ k) * centred).sum(axis=1)   # one BLAS product, not an einsum loop
    trace = float(deviations.sum() / (r - 1))
    return trace, float(mean @ k @ mean - trace / r), deviations


def estimator_coefficients(kind: str, rewards, lengths, groups, num_groups: int, epsilon: float = 1e-6,
                           grpo_advantage=None) -> np.ndarray:
    """Per-sample c_j of one draw (its gradient is Σ_j c_j v_j, v_j = ∇ Σ_t log π of sample j).

    `rewards` (0/1: accepted), `lengths` (completion tokens) and `groups` (prompt index in
    [0, num_groups)) are [n], one entry per sample drawn. Kinds:
    - `grpo_token_mean`, `raft_token_mean`: the learner's loss (§GRPO.5 token mean over every sample
      of the batch, §GRPO.2 / §RAFT advantages): c_j = −A_j / Σ_k |y_k|;
    - `grpo_prompt_mean`, `raft_prompt_mean`: each prompt's token mean over its own samples, then the
      plain mean over the B prompts: c_j = −A_j / (B Σ_{k∈i} |y_k|); the expectation then no longer
      weights a prompt by how many samples it was given;
    - `raft_accepted_mean`: §GVM.2's per-prompt estimator (the EM view of §RAFT): a prompt's token mean
      over its *accepted* samples, prompts averaged: c_j = −1[acc_j] / (B Σ_{k∈i, acc} |y_k|).
    `grpo_advantage`: the draw's §GRPO.2 advantages if already computed (else computed here, ε = `epsilon`).
    """
    r = np.asarray(rewards, dtype=np.float64)
    length = np.asarray(lengths, dtype=np.float64)
    group = np.asarray(groups, dtype=np.int64)
    if not (r.shape == length.shape == group.shape) or r.ndim != 1:
        raise ValueError("rewards, lengths and groups must be 1-D and of one length")
    if kind not in ESTIMATORS:
        raise ValueError(f"kind must be one of {ESTIMATORS}, got {kind!r}")
    if r.size == 0:
        return np.zeros(0)
    accepted = (r == 1).astype(np.float64)
    if kind.startswith("grpo") and grpo_advantage is not None:
        advantage = np.asarray(grpo_advantage, dtype=np.float64)
    elif kind.startswith("grpo"):
        advantage = grpo_advantages(torch.as_tensor(r), torch.as_tensor(group), epsilon=epsilon).numpy()
    else:
        advantage = accepted
    if kind.endswith("token_mean"):
        return -advantage / length.sum()
    weighted = length * accepted if kind == "raft_accepted_mean" else length
    per_group = np.bincount(group, weights=weighted, minlength=num_groups)
    denominator = num_groups * per_group[group]
    return np.where(denominator > 0, -advantage / np.where(denominator > 0, denominator, 1.0), 0.0)


def gvm2_objective(counts, acceptance_rate, grad_norm) -> float:
    """§GVM.2's variance proxy Σ_i G_i² / (n_i p_i) over prompts with p_i > 0 (inf if such a prompt has n_i = 0)."""
    n = np.asarray(counts, dtype=np.float64)
    p = np.asarray(acceptance_rate, dtype=np.float64)
    g = np.asarray(grad_norm, dtype=np.float64)
    live = p > 0
    if (n[live] <= 0).any():
        return float("inf")
    return float((g[live] ** 2 / (n[live] * p[live])).sum())


def bootstrap_ratio_interval(numerator, denominator, reps: int = 2000, seed: int = 0,
                             statistic=None) -> tuple[float, float]:
    """95% percentile interval of statistic(a) / statistic(b), a and b resampled independently.

    `numerator`, `denominator`: per-draw arrays (statistic = mean) or Gram matrices of draws
    (pass `statistic=gram_covariance_trace`; rows and columns are resampled together)."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)

    def resampled(x):
        index = rng.integers(0, x.shape[0], size=x.shape[0])
        return statistic(x[np.ix_(index, index)]) if statistic is not None else float(x[index].mean())

    ratios = []
    for _ in range(reps):
        bottom = resampled(b)
        ratios.append(resampled(a) / bottom if bottom > 0 else np.inf)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)
