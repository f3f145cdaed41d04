"""ALGORITHMS.md §BVPO.3 ``per_term`` pairing on a hand case (python floats, float64 tensors) and
§BVPO.6 α̂ with resamples per prompt (issue 17)."""

from __future__ import annotations

import math

import pytest
import torch

from rl_service.algorithms.preference import OnlineAlphaEstimator, PreferenceLogps, bvpo_loss, bvpo_per_term_loss

F64 = torch.float64


def _softplus_neg(h: float) -> float:
    return math.log1p(math.exp(-h))


def test_per_term_loss_equals_the_formula_on_a_hand_case():
    """§BVPO.3 per_term: L = α·mean of the trace pairs + (1 − α)·mean of the empty pairs, each over
    its own count (3 trace pairs, 2 empty ones), checked against python floats; slices add up to
    it, a step with no pair in one term uses the other alone, and equal counts give bvpo_loss."""
    alpha, beta = 0.3, 0.5
    trace_rows = [(-1.0, -2.0, -1.5, -1.5), (-3.0, -2.5, -2.0, -2.0), (-0.5, -4.0, -1.0, -3.0)]
    empty_rows = [(-2.0, -1.0, -2.5, -1.5), (-1.2, -1.6, -1.4, -1.4)]

    def logps(rows, requires_grad=False):
        columns = [torch.tensor(column, dtype=F64, requires_grad=requires_grad) for column in zip(*rows)] if rows else \
            [torch.zeros(0, dtype=F64) for _ in range(4)]
        return PreferenceLogps(*columns)

    def hand(rows):
        return [_softplus_neg(beta * ((pc - rc) - (pr - rr))) for pc, pr, rc, rr in rows]

    trace_hand, empty_hand = hand(trace_rows), hand(empty_rows)
    want = alpha * sum(trace_hand) / 3 + (1 - alpha) * sum(empty_hand) / 2
    trace, empty = logps(trace_rows, True), logps(empty_rows, True)
    loss = bvpo_per_term_loss(trace, empty, alpha, beta)
    assert loss.dtype == F64 and float(loss) == pytest.approx(want, rel=0, abs=1e-14)
    # Gradient w.r.t. a trace pair's chosen log-prob: α/N_t · ∂softplus(−h)/∂h · β = −α β σ(−h_0) / 3.
    loss.backward()
    h0 = beta * ((-1.0 + 1.5) - (-2.0 + 1.5))
    assert float(trace.policy_chosen_logps.grad[0]) == pytest.approx(-alpha * beta / (1 + math.exp(h0)) / 3, abs=1e-14)
    assert float(empty.policy_rejected_logps.grad[1]) == pytest.approx((1 - alpha) * beta / (1 + math.exp(
        beta * ((-1.2 + 1.4) - (-1.6 + 1.4)))) / 2, abs=1e-14)
    # Micro-batch slices, with the step totals, add up to the whole loss.
    first = bvpo_per_term_loss(logps(trace_rows[:2]), logps(empty_rows[:0]), alpha, beta, 3, 2)
    second = bvpo_per_term_loss(logps(trace_rows[2:]), logps(empty_rows), alpha, beta, 3, 2)
    assert float(first + second) == pytest.approx(want, rel=0, abs=1e-14)
    # No empty pair this step: the trace term alone (α_eff = 1), and vice versa.
    assert float(bvpo_per_term_loss(logps(trace_rows), logps([]), alpha, beta)) == pytest.approx(sum(trace_hand) / 3, abs=1e-14)
    assert float(bvpo_per_term_loss(logps([]), logps(empty_rows), alpha, beta)) == pytest.approx(sum(empty_hand) / 2, abs=1e-14)
    with pytest.raises(ValueError):
        bvpo_per_term_loss(logps([]), logps([]), alpha, beta)
    with pytest.raises(ValueError):   # a slice larger than the step's totals
        bvpo_per_term_loss(logps(trace_rows), logps(empty_rows), alpha, beta, 2, 2)
    # Same prompts (one pair per mode each): per_term IS bvpo_loss, the same_prompts loss, unchanged.
    same_empty = empty_rows + [(-0.7, -0.9, -0.8, -0.8)]
    unchanged, _ = bvpo_loss(logps(trace_rows), logps(same_empty), alpha, beta)
    assert float(unchanged) == pytest.approx(alpha * sum(trace_hand) / 3 + (1 - alpha) * sum(hand(same_empty)) / 3, abs=1e-14)
    assert float(bvpo_per_term_loss(logps(trace_rows), logps(same_empty), alpha, beta)) == pytest.approx(float(unchanged), abs=1e-14)


def test_online_alpha_per_prompt_pools_the_prompts_variances():
    """[B, K, P] resamples per prompt (§BVPO.6): tr Σ̂_t = Σ_i tr Σ̂_i / B² (the variance of a batch
    gradient of one pair per prompt), ḡ_t the mean over prompts and resamples; B = 1 is the [K, P] form."""
    g = torch.Generator().manual_seed(7)
    grads = torch.randn(3, 4, 5, generator=g, dtype=F64)
    g_e = torch.randn(5, generator=g, dtype=F64)
    estimator = OnlineAlphaEstimator(ema_decay=0.0)
    alpha = estimator.update(grads, g_e)
    variance = sum(float(((grads[i] - grads[i].mean(0)) ** 2).sum()) / 3 for i in range(3)) / 9
    gap = g_e - grads.mean(dim=(0, 1))
    bias_sq = max(float(gap @ gap) - variance / 4, 0.0)
    assert estimator.trace_variance == pytest.approx(variance, rel=1e-12)
    assert estimator.bias_sq == pytest.approx(bias_sq, rel=1e-12) and bias_sq > 0
    assert alpha == pytest.approx(bias_sq / (variance + bias_sq), rel=1e-12)
    single, batch = OnlineAlphaEstimator(ema_decay=0.0), OnlineAlphaEstimator(ema_decay=0.0)
    assert single.update(grads[:1], g_e) == batch.update(grads[0], g_e)
    assert single.state_dict() == batch.state_dict()
