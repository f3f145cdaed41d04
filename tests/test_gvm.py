"""ALGORITHMS.md §GVM.3–4 and §GVM.6: weights, integer allocation, bounds, smoothing, spread metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rl_service.algorithms.gvm import (
    _clipped_targets,
    allocation_spread_metrics,
    gvm_allocation,
    gvm_weights,
    laplace_smoothed_acceptance,
    round_preserving_sum,
)
from rl_service.algorithms.gvm import uniform_allocation

ONES = np.ones


def _naive_code_rule(acceptance_rate, grad_norm, budget, alpha=1e-3, beta=2.0):
    """§GVM.3–4 written out literally: weights, n* = N w / Σw, rint, then one sample at a time."""
    weights = []
    for p, g in zip(acceptance_rate, grad_norm):
        weights.append(0.0 if p == 0 or g == 0 else g / math.sqrt(p + alpha / p ** (beta - 1)))
    total_weight = float(np.sum(weights))
    if total_weight == 0:
        return uniform_allocation(len(weights), budget)
    n_star = [budget * w / total_weight for w in weights]
    counts = [round(x) for x in n_star]  # Python's round is half to even
    residual = [x - c for x, c in zip(n_star, counts)]
    while sum(counts) < budget:  # largest residual, lower index first
        i = max(range(len(counts)), key=lambda k: (residual[k], -k))
        counts[i] += 1
        residual[i] -= 1
    while sum(counts) > budget:  # smallest residual, lower index first
        i = min(range(len(counts)), key=lambda k: (residual[k], k))
        counts[i] -= 1
        residual[i] += 1
    return counts


def _random_problem(rng, ties: bool):
    size = int(rng.integers(1, 40))
    if ties:  # small integer weights (p = 1, α = 0 ⇒ w = G): many exact .5 targets and equal residuals
        return ONES(size), rng.integers(0, 4, size).astype(float), int(rng.integers(0, 3 * size + 1)), 0.0
    p = rng.uniform(0, 1, size)
    p[rng.uniform(size=size) < 0.15] = 0.0
    g = rng.exponential(1.0, size)
    g[rng.uniform(size=size) < 0.1] = 0.0
    return p, g, int(rng.integers(0, 20 * size + 1)), 1e-3


# --- §GVM.3 weights ---------------------------------------------------------------------------------

def test_weights_three_prompts_by_hand():
    p, g = [0.25, 0.5, 1.0], [2.0, 1.0, 3.0]
    # β = 2: α / p = 0.004, 0.002, 0.001.
    expected = [2 / math.sqrt(0.254), 1 / math.sqrt(0.502), 3 / math.sqrt(1.001)]
    np.testing.assert_allclose(gvm_weights(p, g), expected, rtol=1e-15, atol=0)
    # β = 3, α = 0.01: α / p² = 0.16, 0.04, 0.01.
    expected = [2 / math.sqrt(0.41), 1 / math.sqrt(0.54), 3 / math.sqrt(1.01)]
    np.testing.assert_allclose(gvm_weights(p, g, alpha=0.01, beta=3.0), expected, rtol=1e-15, atol=0)
    # α = 0: the unregularised G / √p of §GVM.2.
    np.testing.assert_allclose(gvm_weights(p, g, alpha=0.0), [4.0, math.sqrt(2), 3.0], rtol=1e-15)
    assert gvm_weights(p, g).dtype == np.float64


def test_zero_acceptance_or_zero_grad_norm_gets_weight_zero():
    w = gvm_weights([0.0, 0.5, 1e-300, 0.5], [5.0, 0.0, 1.0, 1.0], alpha=1e-3, beta=4.0)
    assert w[0] == 0 and w[1] == 0 and w[2] == 0 and w[3] > 0
    assert gvm_weights([0.0], [1.0], alpha=0.0)[0] == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(acceptance_rate=[0.5, np.nan], grad_norm=[1, 1]), r"acceptance_rate\[1\]"),
    (dict(acceptance_rate=[0.5, 0.5, 0.5], grad_norm=[1, 1, np.inf]), r"grad_norm\[2\]"),
    (dict(acceptance_rate=[1.5], grad_norm=[1]), r"acceptance_rate\[0\]"),
    (dict(acceptance_rate=[0.5], grad_norm=[-1]), r"grad_norm\[0\]"),
    (dict(acceptance_rate=[0.5, 0.5], grad_norm=[1]), "shape"),
    (dict(acceptance_rate=[0.5], grad_norm=[1], alpha=-1e-3), "alpha"),
    (dict(acceptance_rate=[0.5], grad_norm=[1], beta=0.5), "beta"),
])
def test_weights_reject_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gvm_weights(**kwargs)


# --- §GVM.4 rounding ----------------------------------------------------------------------------------

def test_round_preserving_sum_spec_example_is_code_rule_not_largest_remainder():
    # §GVM.4: n* = [0.5, 1.5] → rint (half to even) [0, 2], already summing to 2; largest remainder: [1, 1].
    np.testing.assert_array_equal(round_preserving_sum([0.5, 1.5], 2), [0, 2])
    # The same targets through the allocator: p = 1, α = 0 ⇒ w = G = [1, 3], n* = 2·[1, 3]/4.
    np.testing.assert_array_equal(gvm_allocation([1, 1], [1, 3], 2, alpha=0.0), [0, 2])


@pytest.mark.parametrize("targets, total, expected", [
    ([1 / 3, 1 / 3, 1 / 3], 1, [1, 0, 0]),        # add: equal residuals, lower index first
    ([2 / 3, 2 / 3, 2 / 3], 2, [0, 1, 1]),        # remove: equal residuals, lower index first
    ([2.5, 2.5, 1.0], 6, [3, 2, 1]),              # rint → [2, 2, 1]; +1 at the first 0.5 residual
    ([1.5, 1.5, 1.0], 4, [1, 2, 1]),              # rint → [2, 2, 1]; −1 at the first −0.5 residual
    ([0.2, 0.7, 2.6, 0.5], 4, [0, 1, 3, 0]),      # rint → [0, 1, 3, 0], exact already
    ([0.45, 0.45, 0.1], 1, [1, 0, 0]),
    ([], 0, []),
])
def test_round_preserving_sum_by_hand(targets, total, expected):
    counts = round_preserving_sum(targets, total)
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, expected)


def test_round_preserving_sum_rejects_targets_not_summing_to_total():
    with pytest.raises(ValueError, match="sum"):
        round_preserving_sum([0.5, 0.5], 2)
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        round_preserving_sum([0.5, 1.5], 2, lower=1, upper=3)
    with pytest.raises(ValueError, match=r"targets\[0\]"):
        round_preserving_sum([np.nan, 1.0], 1)


def test_equal_weights_follow_the_code_rule():
    # n* = 4/3 each → rint 1, +1 at index 0; n* = 5/3 → rint 2, −1 at index 0.
    np.testing.assert_array_equal(gvm_allocation([0.5] * 3, [1.0] * 3, 4), [2, 1, 1])
    np.testing.assert_array_equal(gvm_allocation([0.5] * 3, [1.0] * 3, 5), [1, 2, 2])


def test_zero_weight_prompts_get_nothing_without_bounds():
    counts = gvm_allocation([0.0, 0.5, 0.5, 0.2], [1.0, 0.0, 2.0, 2.0], 12)
    assert counts[0] == 0 and counts[1] == 0 and counts.sum() == 12


def test_all_zero_weights_fall_back_to_uniform():
    np.testing.assert_array_equal(gvm_allocation([0.0, 0.0, 0.0], [1.0, 2.0, 3.0], 10), [4, 3, 3])
    np.testing.assert_array_equal(gvm_allocation([0.5, 0.9], [0.0, 0.0], 7, n_min=1, n_max=4), [4, 3])


@pytest.mark.parametrize("ties", [False, True])
def test_unbounded_allocation_equals_naive_code_rule(ties):
    rng = np.random.default_rng(1234 + ties)
    for _ in range(400):
        p, g, budget, alpha = _random_problem(rng, ties)
        beta = float(rng.choice([1.0, 2.0, 3.0]))
        counts = gvm_allocation(p, g, budget, alpha=alpha, beta=beta)
        assert counts.sum() == budget and counts.min() >= 0
        np.testing.assert_array_equal(counts, _naive_code_rule(p, g, budget, alpha, beta))
        # Loose bounds that do not bind change nothing.
        if budget and len(p) > 1:
            loose = gvm_allocation(p, g, budget, alpha=alpha, beta=beta, n_min=0, n_max=budget)
            np.testing.assert_array_equal(loose, counts)


# --- §GVM.4 bounds (ours) -------------------------------------------------------------------------------

def test_both_bounds_bind_by_hand():
    # p = 1, α = 0 ⇒ w = G = [6, 1, 1, 0]; N = 16, n ∈ [1, 8]. Unbounded n* = [12, 2, 2, 0] breaks both.
    # Zero weight → 1; the rest, 15 = 8 + 2λ ⇒ λ = 3.5 (6λ = 21 ≥ 8 ✓): n* = [8, 3.5, 3.5, 1].
    # rint (half to even) → [8, 4, 4, 1] = 17; −1 at the first −0.5 residual → [8, 3, 4, 1].
    p, g = ONES(4), [6.0, 1.0, 1.0, 0.0]
    np.testing.assert_allclose(_clipped_targets(np.array(g), 16, 1, 8), [8, 3.5, 3.5, 1], rtol=1e-14)
    np.testing.assert_array_equal(gvm_allocation(p, g, 16, alpha=0.0, n_min=1, n_max=8), [8, 3, 4, 1])


def test_lower_bound_binds_by_hand():
    # w = [10, 1, 1], N = 12, n_min = 2: unbounded [10, 1, 1]; λ·10 + 2 + 2 = 12 ⇒ λ = 0.8 (0.8 < 2 ✓).
    np.testing.assert_array_equal(gvm_allocation(ONES(3), [10.0, 1.0, 1.0], 12, alpha=0.0, n_min=2), [8, 2, 2])


def test_upper_bound_binds_by_hand():
    # w = [5, 2, 1], N = 10, n_max = 4: unbounded [6.25, 2.5, 1.25]; 4 + 3λ = 10 ⇒ λ = 2: [4, 4, 2].
    np.testing.assert_array_equal(gvm_allocation(ONES(3), [5.0, 2.0, 1.0], 10, alpha=0.0, n_max=4), [4, 4, 2])


def test_zero_weights_absorb_what_saturated_prompts_cannot_take():
    # w = [1, 0, 0], n_max = 3: the positive prompt saturates, zero weights share the rest evenly.
    np.testing.assert_array_equal(gvm_allocation(ONES(3), [1.0, 0.0, 0.0], 7, n_max=3), [3, 2, 2])
    np.testing.assert_array_equal(gvm_allocation(ONES(3), [1.0, 0.0, 0.0], 8, n_max=3), [3, 3, 2])
    np.testing.assert_array_equal(gvm_allocation(ONES(3), [1.0, 0.0, 0.0], 9, n_max=3), [3, 3, 3])


def test_budget_exactly_at_a_bound():
    p, g = [0.2, 0.5, 0.9], [1.0, 3.0, 0.0]
    np.testing.assert_array_equal(gvm_allocation(p, g, 6, n_min=2), [2, 2, 2])
    np.testing.assert_array_equal(gvm_allocation(p, g, 12, n_max=4), [4, 4, 4])


def _bisection_targets(weights, budget, lower, upper):
    def total(scale):
        return np.clip(scale * weights, lower, upper).sum()
    low, high = 0.0, 1.0
    while total(high) < budget:
        high *= 2
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if total(mid) < budget else (low, mid)
    return np.clip(high * weights, lower, upper)


def test_bounded_allocation_on_random_problems():
    rng = np.random.default_rng(7)
    for case in range(400):
        p, g, _, alpha = _random_problem(rng, ties=case % 4 == 0)
        size = len(p)
        n_min = int(rng.integers(0, 3))
        n_max = int(rng.integers(max(n_min, 1), 12))
        budget = int(rng.integers(n_min * size, n_max * size + 1))
        counts = gvm_allocation(p, g, budget, alpha=alpha, n_min=n_min, n_max=n_max)
        assert counts.sum() == budget
        assert counts.min() >= n_min and counts.max() <= n_max
        weights = gvm_weights(p, g, alpha)
        positive = weights > 0
        if positive.any() and budget - n_min * (~positive).sum() < n_max * positive.sum():
            expected = _bisection_targets(weights, budget, n_min, n_max)
            np.testing.assert_allclose(_clipped_targets(weights, budget, n_min, n_max), expected,
                                       rtol=1e-9, atol=1e-9)
            assert np.all(np.abs(counts - expected) < 1.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(budget=5, n_min=2), r"n_min·B"),
    (dict(budget=13, n_max=4), r"n_max·B"),
    (dict(budget=6, n_min=3, n_max=2), "exceeds"),
    (dict(budget=6, alpha=-1.0), "alpha"),
    (dict(budget=6, beta=0.0), "beta"),
    (dict(budget=-1), "budget"),
    (dict(budget=6.0), "budget"),
])
def test_allocation_rejects_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gvm_allocation([0.2, 0.5, 0.9], [1.0, 2.0, 3.0], **kwargs)


def test_allocation_of_1024_prompts_spends_the_budget_within_bounds():
    # Speed is measured in benchmarks/gvm_allocation_scale.py, never asserted here.
    rng = np.random.default_rng(0)
    p, g = rng.uniform(0, 1, 1024), rng.exponential(1.0, 1024)
    for bounds in ({}, {"n_min": 4, "n_max": 16}):
        counts = gvm_allocation(p, g, 8 * 1024, **bounds)
        assert counts.sum() == 8 * 1024
        assert counts.min() >= bounds.get("n_min", 0) and counts.max() <= bounds.get("n_max", 8 * 1024)


# --- §GVM.6 smoothing and logging -------------------------------------------------------------------------

def test_laplace_smoothed_acceptance():
    assert laplace_smoothed_acceptance(3.0, 5.0) == pytest.approx(4 / 7, rel=1e-15)
    np.testing.assert_allclose(laplace_smoothed_acceptance([0.0, 2.5, 4.0], [0.0, 4.0, 4.0]),
                               [0.5, 3.5 / 6, 5 / 6], rtol=1e-15)
    with pytest.raises(ValueError):
        laplace_smoothed_acceptance(5.0, 4.0)
    with pytest.raises(ValueError):
        laplace_smoothed_acceptance(-1.0, 4.0)


def test_allocation_spread_metrics():
    counts = [0, 4, 2, 10, 0, 3, 5, 1, 7, 8, 0]  # 11 prompts: the hardest decile is ⌈1.1⌉ = 2 prompts
    acceptance = [0.9, 0.05, 0.6, 0.05, 0.3, 0.5, 0.4, 0.2, 0.7, 0.8, 1.0]
    metrics = allocation_spread_metrics(counts, acceptance)
    assert metrics == {
        "allocation_samples_min": 0.0,
        "allocation_samples_median": 3.0,
        "allocation_samples_max": 10.0,
        "allocation_hardest_decile_share": pytest.approx(14 / 40),  # prompts 1 and 3 (p = 0.05)
        "allocation_zero_fraction": pytest.approx(3 / 11),
    }
    assert allocation_spread_metrics([0, 0], [0.1, 0.2])["allocation_hardest_decile_share"] == 0.0
