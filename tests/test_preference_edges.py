"""Edge cases of the §DPO and §BVPO losses, against hand-computed float64 values."""

from __future__ import annotations

import math

import pytest
import torch

from rl_service.algorithms.preference import PreferenceLogps, bvpo_loss, bvpo_per_term_loss, dpo_loss, dpo_pair_losses


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def _pair(chosen, rejected, ref_chosen, ref_rejected, grad=False):
    policy_chosen = _t(chosen).requires_grad_(grad)
    return PreferenceLogps(policy_chosen, _t(rejected), _t(ref_chosen), _t(ref_rejected))


@pytest.mark.parametrize("beta", [math.inf, -1.0, 0.0, math.nan])
def test_beta_must_be_finite_and_positive(beta):
    # §DPO: h = β[…], β > 0. β = inf made h = inf · 0 = NaN for a pair with equal log-ratios, and the
    # per-pair losses behind per_term BVPO took any β, a negative one training the wrong way.
    pair = _pair(-1.0, -1.0, -2.0, -2.0)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pair.policy_chosen_logps, pair.policy_rejected_logps, pair.ref_chosen_logps,
                 pair.ref_rejected_logps, beta=beta)
    with pytest.raises(ValueError, match="beta"):
        dpo_pair_losses(pair, beta=beta)
    with pytest.raises(ValueError, match="beta"):
        bvpo_per_term_loss(pair, pair, 0.5, beta=beta)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_bvpo_at_alpha_0_or_1_is_the_one_term_alone(alpha):
    # §BVPO.3: L = α L_t + (1 − α) L_e, so α = 1 is L_t and α = 0 is L_e. The other term's log-probs
    # may be −inf (a token of probability 0): 0 · inf must not turn the loss into NaN.
    # Kept term: h = 0.1 · ((−1 + 1.5) − (−2 + 1.5)) = 0.1 ⇒ L = softplus(−0.1) = log(1 + e^−0.1).
    kept = _pair(-1.0, -2.0, -1.5, -1.5, grad=True)
    broken = _pair(-math.inf, -1.0, -1.0, -1.0)
    trace, empty = (kept, broken) if alpha == 1.0 else (broken, kept)
    loss, _ = bvpo_loss(trace, empty, alpha)
    expected = math.log1p(math.exp(-0.1))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    # d softplus(−h) / d log π_θ(y_w) = −β σ(−h) = −0.1 / (1 + e^0.1).
    assert kept.policy_chosen_logps.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.1)), rel=1e-12)
