"""Hand cases for the pure helpers of benchmarks/gvm_variance.py (covariance traces, estimator coefficients)."""
import math

import numpy as np
import pytest

from benchmarks.gvm_variance_math import (bootstrap_ratio_interval, coefficient_moments, covariance_trace,
                                          estimator_coefficients, gram_covariance_trace, gram_mean_sq_norm,
                                          gvm2_objective)

DRAWS = np.array([[1.0, 0.0], [3.0, 0.0], [2.0, 3.0]])   # mean (2, 1); squared deviations 2, 2, 4


def test_covariance_trace_by_hand():
    assert covariance_trace(DRAWS) == pytest.approx(8.0 / 2)
    gram = DRAWS @ DRAWS.T
    assert gram_covariance_trace(gram) == pytest.approx(4.0)
    # ‖ḡ‖² = 5, less the mean's own noise tr Cov / R = 4/3
    assert gram_mean_sq_norm(gram) == pytest.approx(5.0 - 4.0 / 3)
    with pytest.raises(ValueError):
        covariance_trace(DRAWS[:1])


def test_coefficient_moments_match_explicit_vectors():
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    coefficients = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])   # draws (1,1), (1,0), (0,1)
    trace, mean_sq, deviations = coefficient_moments(coefficients, vectors @ vectors.T)
    assert trace == pytest.approx(2.0 / 3)   # squared deviations 2/9, 5/9, 5/9
    assert deviations == pytest.approx([2 / 9, 5 / 9, 5 / 9])
    assert mean_sq == pytest.approx(8.0 / 9 - trace / 3)
    assert trace == pytest.approx(covariance_trace(coefficients @ vectors))


def test_estimator_coefficients_by_hand():
    # prompt 0: rewards 1, 0 with 2 and 4 tokens; prompt 1: rewards 1, 1 with 3 and 1 tokens (10 tokens)
    rewards, lengths, groups = [1, 0, 1, 1], [2, 4, 3, 1], [0, 0, 1, 1]
    a = 0.5 / math.sqrt(0.5)   # GRPO: mean 0.5, Bessel std √0.5; prompt 1 is flat: A = 0
    expected = {
        "raft_token_mean": [-0.1, 0.0, -0.1, -0.1],
        "grpo_token_mean": [-a / 10, a / 10, 0.0, 0.0],
        "grpo_prompt_mean": [-a / 12, a / 12, 0.0, 0.0],        # B = 2 prompts, prompt 0 has 6 tokens
        "raft_prompt_mean": [-1 / 12, 0.0, -1 / 8, -1 / 8],     # prompt 1 has 4 tokens
        "raft_accepted_mean": [-1 / 4, 0.0, -1 / 8, -1 / 8],    # accepted tokens: 2 and 4
    }
    for kind, values in expected.items():
        assert estimator_coefficients(kind, rewards, lengths, groups, 2) == pytest.approx(values, rel=1e-5), kind
    # a prompt with no accepted sample contributes nothing to the accepted mean (no division by zero)
    assert estimator_coefficients("raft_accepted_mean", [0, 0, 1], [3, 3, 2], [0, 0, 1], 2) == pytest.approx([0, 0, -0.25])
    with pytest.raises(ValueError):
        estimator_coefficients("sum", rewards, lengths, groups, 2)


def test_gvm2_objective_and_bootstrap():
    assert gvm2_objective([2, 4, 0], [0.5, 0.25, 0.0], [1.0, 2.0, 7.0]) == pytest.approx(1.0 + 4.0)
    assert gvm2_objective([0, 4], [0.5, 0.25], [1.0, 2.0]) == math.inf
    assert bootstrap_ratio_interval([2.0, 2.0, 2.0], [1.0, 1.0, 1.0], reps=50) == pytest.approx((2.0, 2.0))
