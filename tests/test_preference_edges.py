"""Edge cases of the §DPO and §BVPO losses, against hand-computed float64 values."""

from __future__ import annotations

import math

import pytest
import torch

from rl_service.algorithms.preference import PreferenceLogps, bvpo_per_term_loss, dpo_loss, dpo_pair_losses


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def _pair(chosen, rejected, ref_chosen, ref_rejected):
    return PreferenceLogps(_t(chosen), _t(rejected), _t(ref_chosen), _t(ref_rejected))


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
