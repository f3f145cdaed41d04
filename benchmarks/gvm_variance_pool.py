"""Allocation rules and the sample-pool engine of `benchmarks/gvm_variance.py`.

The pool engine: M samples per prompt from the frozen policy, each one's full-parameter gradient
v_j = ∇_θ Σ_t log π_θ(y_jt | ·) and the Gram matrix K = V Vᵀ (exact, float64 sums). A simulated draw
takes n_i samples of prompt i from its M, with replacement, so it is an independent draw from the
pool's empirical distribution; its gradient under any estimator is Σ_j c_j v_j (see
`gvm_variance_math.py`), so the covariance trace of thousands of draws costs quadratic forms only.
Every allocation rule — the diagnostic ones too — is then measured on the same footing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from benchmarks.gvm_variance_math import ESTIMATORS, coefficient_moments, estimator_coefficients
from rl_service.algorithms.advantages import grpo_advantages
from rl_service.algorithms.gvm import gvm_allocation, online_gvm_allocation
from rl_service.statistics.prompt_stats import GroupStatistics, PromptStatistics


def pilot_allocation(accepted, samples, grad_norm, budget: int, settings) -> np.ndarray:
    """§GVM.3–4 on a pilot's p̂ = accepted / samples and Ĝ (mean §GVM.1 norm over accepted; none: 0,
    which gives weight 0 as p̂ = 0 does), with the configured α, β, n_min, n_max."""
    p = np.asarray(accepted, dtype=np.float64) / np.asarray(samples, dtype=np.float64)
    g = np.nan_to_num(np.asarray(grad_norm, dtype=np.float64), nan=0.0)
    return gvm_allocation(p, g, budget, alpha=settings.alpha, beta=settings.beta,
                          n_min=settings.n_min, n_max=settings.n_max)


class OnlineAllocator:
    """§GVM.6 as the statistics role runs it: the project's `PromptStatistics` moving averages and
    online policy, fed with every earlier draw of the same prompts (frozen policy: no drift)."""

    def __init__(self, settings, prompt_ids, budget: int):
        self.settings, self.prompt_ids, self.budget = settings, np.asarray(prompt_ids), budget
        self.stats = PromptStatistics(settings.ema_weight)

    def allocate(self) -> np.ndarray:
        s = self.settings
        if hasattr(self.stats, "allocation_inputs"):   # the one pure policy of rl_service/algorithms/gvm.py
            from rl_service.algorithms.gvm import online_gvm_allocation

            inputs = self.stats.allocation_inputs(self.prompt_ids, s.laplace_smoothing)
            return online_gvm_allocation(**inputs, budget=self.budget, alpha=s.alpha, beta=s.beta,
                                         n_min=s.n_min, n_max=s.n_max, n_pilot=s.n_pilot)
        return self.stats.gvm_allocate(self.prompt_ids, self.budget, alpha=s.alpha, beta=s.beta, n_min=s.n_min,
                                       n_max=s.n_max, n_pilot=s.n_pilot, laplace=s.laplace_smoothing)

    def acceptance_estimates(self) -> np.ndarray:
        """p̄ of RAFT++'s expected-count normaliser, as the statistics role gives it to the learner."""
        return self.stats.expected_count_acceptance(self.prompt_ids)

    def observe(self, accepted, samples, grad_norm) -> None:
        self.stats.update_acceptance(self.prompt_ids, accepted, samples)
        self.stats.update_grad_norms(self.prompt_ids, grad_norm)


class GroupAllocator(OnlineAllocator):
    """`statistics.unseen_prompts: group`: every prompt allocated as one never seen, from its group's
    (difficulty level's) moving averages, the statistics role's `GroupStatistics` fed by every earlier
    draw. A prompt's own earlier samples are in its group's averages, one prompt of B / levels."""

    def __init__(self, settings, prompt_ids, groups, budget: int):
        super().__init__(settings, prompt_ids, budget)
        self.groups, self.stats = list(groups), GroupStatistics(settings.ema_weight)

    def allocate(self) -> np.ndarray:
        s = self.settings
        never_seen = PromptStatistics().allocation_inputs(self.prompt_ids, s.laplace_smoothing)
        return online_gvm_allocation(**never_seen, budget=self.budget, alpha=s.alpha, beta=s.beta, n_min=s.n_min,
                                     n_max=s.n_max, n_pilot=s.n_pilot,
                                     group=self.stats.allocation_inputs_of_groups(self.groups, s.laplace_smoothing))

    def observe(self, accepted, samples, grad_norm) -> None:
        self.stats.update_acceptance_of_groups(self.groups, accepted, samples)
        self.stats.update_grad_norms_of_groups(self.groups, grad_norm)


@dataclass
class Pool:
    rewards: np.ndarray       # [P] 0/1
    lengths: np.ndarray       # [P] completion tokens
    groups: np.ndarray        # [P] prompt index
    emb_norm: np.ndarray      # [P] §GVM.1 embedding-gradient norm (NaN: rejected)
    full_norm: np.ndarray     # [P] ‖v_j‖ (NaN: not stored)
    stored: np.ndarray        # [P] row of K, −1 for a sample whose coefficient is always 0
    gram: np.ndarray          # [S, S] float64
    members: list             # per prompt, its pool rows
    vectors: torch.Tensor     # [S, D] float32 (for the learner cross-check)

    @property
    def num_prompts(self) -> int:
        return len(self.members)

    def per_prompt(self, values, rows=None) -> np.ndarray:
        """Mean of `values` over each prompt's pool rows (NaN entries skipped; NaN if none)."""
        values = np.asarray(values, dtype=np.float64)
        out = np.full(self.num_prompts, np.nan)
        for i, members in enumerate(self.members):
            finite = values[members][np.isfinite(values[members])]
            if finite.size:
                out[i] = finite.mean()
        return out

    def oracle(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p, G_embedding, G_full) per prompt from all M samples (G over accepted samples; 0 if none)."""
        p = self.per_prompt(self.rewards)
        accepted_full = np.where(self.rewards == 1, self.full_norm, np.nan)
        return p, np.nan_to_num(self.per_prompt(self.emb_norm)), np.nan_to_num(self.per_prompt(accepted_full))


def build_pool(policy, per_prompt: int, seed: int, chunk: int = 1 << 16) -> tuple[Pool, object]:
    """Draw the pool, its per-sample gradients (only samples of prompts with an accepted pool sample:
    elsewhere every estimator's coefficient is 0) and K = V Vᵀ, summed over parameter chunks in float64."""
    result = policy.draw([per_prompt] * policy.num_prompts, seed)
    rollout, rewards = result.rollout, result.rewards
    groups = np.asarray(rollout.request_index, dtype=np.int64)
    lengths = np.asarray([len(tokens) for tokens in rollout.completion_token_ids], dtype=np.float64)
    emb = np.asarray(policy.raft.learner.accepted_grad_norms(rollout, rewards.tolist()), dtype=np.float64)
    solved = np.bincount(groups, weights=(rewards == 1).astype(float), minlength=policy.num_prompts) > 0
    rows = np.flatnonzero(solved[groups])
    stored = np.full(len(rewards), -1, dtype=np.int64)
    stored[rows] = np.arange(rows.size)
    vectors = policy.per_sample_gradients(rollout, rows)
    gram = np.zeros((rows.size, rows.size))
    for start in range(0, vectors.shape[1], chunk):
        block = vectors[:, start:start + chunk]
        gram += (block @ block.T).double().numpy()
    gram = (gram + gram.T) / 2
    full = np.full(len(rewards), np.nan)
    full[rows] = np.sqrt(np.clip(np.diag(gram), 0, None))
    members = [np.flatnonzero(groups == i) for i in range(policy.num_prompts)]
    return Pool(rewards, lengths, groups, emb, full, stored, gram, members, vectors), result


@dataclass
class PoolArm:
    trace: dict            # estimator -> tr Cov
    mean_sq: dict          # estimator -> unbiased ‖E g‖²
    mean_coef: dict        # estimator -> c̄ [S]
    deviations: dict       # estimator -> per-draw ‖g_r − ḡ‖²
    zero_advantage: dict   # "grpo" / "raft" -> fraction of drawn samples with A = 0
    counts_mean: np.ndarray


def simulate(pool: Pool, allocate, draws: int, rng: np.random.Generator, observe=None) -> PoolArm:
    """`draws` draws of `allocate(rng) -> counts`; `observe(accepted, samples, grad)` after each (online)."""
    size, prompts = pool.gram.shape[0], pool.num_prompts
    coefficients = {kind: np.zeros((draws, size)) for kind in ESTIMATORS}
    zero = {"grpo": 0.0, "raft": 0.0}
    counts_total, samples_total = np.zeros(prompts), 0
    for r in range(draws):
        counts = np.asarray(allocate(rng), dtype=np.int64)
        picked = np.concatenate([rng.choice(pool.members[i], size=n, replace=True) for i, n in enumerate(counts)])
        rewards, lengths, groups = pool.rewards[picked], pool.lengths[picked], pool.groups[picked]
        rows = pool.stored[picked]
        advantage = grpo_advantages(torch.as_tensor(rewards), torch.as_tensor(groups), epsilon=1e-6).numpy()
        for kind in ESTIMATORS:
            c = estimator_coefficients(kind, rewards, lengths, groups, prompts, grpo_advantage=advantage)
            if np.any(c[rows < 0] != 0):
                raise AssertionError("a sample outside the stored set has a non-zero coefficient")
            np.add.at(coefficients[kind][r], rows[rows >= 0], c[rows >= 0])
            if kind == "grpo_token_mean":
                zero["grpo"] += float((c == 0).sum())
        zero["raft"] += float((rewards != 1).sum())
        counts_total += counts
        samples_total += len(picked)
        if observe is not None:
            accepted = np.bincount(groups, weights=(rewards == 1).astype(float), minlength=prompts)
            emb = pool.emb_norm[picked]
            finite = np.isfinite(emb)
            number = np.bincount(groups[finite], minlength=prompts)
            total = np.bincount(groups[finite], weights=emb[finite], minlength=prompts)
            observe(accepted, counts.astype(float), np.where(number > 0, total / np.maximum(number, 1), np.nan))
    arm = PoolArm({}, {}, {}, {}, {k: v / samples_total for k, v in zero.items()}, counts_total / draws)
    if draws < 2:   # a warm-up: nothing to measure
        return arm
    for kind, c in coefficients.items():
        arm.trace[kind], arm.mean_sq[kind], arm.deviations[kind] = coefficient_moments(c, pool.gram)
        arm.mean_coef[kind] = c.mean(axis=0)
    return arm


def mean_shift(pool: Pool, arm: PoolArm, reference: PoolArm, kind: str, draws: int) -> tuple[float, float]:
    """(‖E g_arm − E g_ref‖ / ‖E g_ref‖, cosine of the two expectations), noise of the means removed."""
    difference = arm.mean_coef[kind] - reference.mean_coef[kind]
    shift_sq = difference @ pool.gram @ difference - (arm.trace[kind] + reference.trace[kind]) / draws
    cross = arm.mean_coef[kind] @ pool.gram @ reference.mean_coef[kind]
    denominator = np.sqrt(max(arm.mean_sq[kind], 1e-300) * max(reference.mean_sq[kind], 1e-300))
    return float(np.sqrt(max(shift_sq, 0.0) / max(reference.mean_sq[kind], 1e-300))), float(cross / denominator)
