"""Edge cases of ALGORITHMS.md §GVM.3–4 and §GVM.6 at the limits of float64, against hand-computed values."""

from __future__ import annotations

from fractions import Fraction
import math

import numpy as np
import pytest

from rl_service.algorithms.gvm import gvm_allocation, online_gvm_allocation, round_preserving_sum


@pytest.mark.parametrize("p, g, budget, alpha, expected", [
    # w = G / √(p + α/p): equal p ⇒ n* ∝ G. Σw overflows float64 although every w is finite.
    ([0.5, 0.5], [1e308, 1e308], 8, 1e-3, [4, 4]),
    ([0.5, 0.5, 0.5], [1e308, 1e308, 1e307], 21, 1e-3, [10, 10, 1]),
    # α = 0: w_0 = 1e300 / √1e-300 = 1e450 overflows, w_1 = 1/√0.5; n* = [8 − 1e-450·…, …] ⇒ [8, 0].
    ([1e-300, 0.5], [1e300, 1.0], 8, 0.0, [8, 0]),
])
def test_weights_beyond_float_range_still_allocate_by_ratio(p, g, budget, alpha, expected):
    # n* = N w / Σw is invariant to scaling every G by one constant (§GVM.3): finite G must allocate.
    counts = gvm_allocation(p, g, budget, alpha=alpha)
    assert counts.tolist() == expected


@pytest.mark.parametrize("budget, kwargs, expected", [
    (17, {}, [8, 8, 1]),
    # n_min = 2: the third prompt sits at 2, λ(8 + 8) = 15 ⇒ n* = [7.5, 7.5, 2]; rint (half to even)
    # gives [8, 8, 2] = 18, one too many, removed at the smallest residual −0.5, lower index first.
    (17, dict(n_min=2), [7, 8, 2]),
    # n_max = 6: both large prompts saturate, the third takes 17 − 12 = 5.
    (17, dict(n_max=6), [6, 6, 5]),
])
def test_bounded_allocation_with_weights_beyond_float_range(budget, kwargs, expected):
    # G in ratio 8 : 8 : 1 exactly (powers of two), equal p ⇒ w in that ratio; Σw overflows float64.
    counts = gvm_allocation([0.5, 0.5, 0.5], [2.0**1023, 2.0**1023, 2.0**1020], budget, **kwargs)
    assert counts.tolist() == expected


def test_budget_past_exact_float64_integers_is_refused_by_name():
    # Beyond 2**53 float64 targets n* cannot hold every integer, so Σ n_i = N exactly (§GVM.4) cannot
    # be promised: the error must name the budget, not blame the bounds.
    with pytest.raises(ValueError, match=r"budget=.*2\*\*53"):
        gvm_allocation([0.3, 0.5, 0.9], [1.0, 2.0, 3.0], 2**60)
    with pytest.raises(ValueError, match=r"total=.*2\*\*53"):
        round_preserving_sum([2.0**60], 2**60)


@pytest.mark.parametrize("budget", [2**53, 2**53 - 1, 10**15 + 7])
def test_largest_exact_budgets_spend_every_sample(budget):
    p, g = [0.3, 0.5, 0.9, 0.7], [1.0, 2.0, 3.0, 0.5]
    counts = gvm_allocation(p, g, budget, alpha=0.0)
    assert int(counts.sum()) == budget
    # Exact rational targets (α = 0: w = G / √p): each count within 1 of its target (plus float error).
    weights = [Fraction(gi) / Fraction(math.sqrt(pi)) for pi, gi in zip(p, g)]
    for count, w in zip(counts.tolist(), weights):
        assert abs(count - budget * w / sum(weights)) <= 2


@pytest.mark.parametrize("field, value, match", [
    ("grad_norm", np.nan, r"grad_norm\[2\]"),
    ("grad_norm", -1.0, r"grad_norm\[2\]"),
    ("acceptance_rate", 1.5, r"acceptance_rate\[2\]"),
])
def test_online_allocation_errors_name_the_batch_index(field, value, match):
    # Prompt 0 is new (pilot), prompts 1–2 are seen: the bad value sits at batch index 2, which is
    # index 1 of the seen prompts alone; the message must point at the caller's index.
    inputs = dict(seen=[False, True, True], acceptance_rate=[0.0, 0.5, 0.5], grad_norm=[0.0, 1.0, 1.0],
                  has_grad_norm=[False, True, True])
    inputs[field] = list(inputs[field])
    inputs[field][2] = value
    with pytest.raises(ValueError, match=match):
        online_gvm_allocation(budget=12, **inputs)
