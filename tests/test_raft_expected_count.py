"""RAFT++ with `accepted_normaliser: expected`: each prompt's accepted samples divided by n_i·p̄_i, the
estimator whose variance §GVM.2 writes as G²/(n p) (ALGORITHMS.md §GVM.2, §RAFT)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rl_service.algorithms.advantages import raft_expected_count_scale


def test_scale_is_observed_over_expected_accepted_count_by_hand():
    accepted = torch.tensor([True, False, False, True, True, False, False, True])
    group = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])
    eligible = torch.tensor([True, True, True, True, True, True, True, False])   # prompt 3's one sample dropped
    estimate = torch.tensor([0.5, 0.25, 0.3, 0.9], dtype=torch.float64)
    scale = raft_expected_count_scale(accepted, group, eligible, estimate)
    # prompt 0: a = 1, n = 3 → 1/(3·0.5); prompt 1: 2/(2·0.25) = 4; prompt 2: no accepted sample → 0;
    # prompt 3: no eligible sample → 0
    assert scale.tolist() == pytest.approx([2 / 3] * 3 + [4.0, 4.0] + [0.0, 0.0] + [0.0], rel=1e-15)
    # An estimate of 0 (never seen accepted) gives the prompt factor 0, as GVM gives it weight 0.
    assert raft_expected_count_scale(accepted[:3], group[:3], eligible[:3], torch.tensor([0.0])).tolist() == [0.0] * 3
    # The estimate equal to the batch's own fraction gives 1: the observed-count mean.
    own = torch.tensor([1 / 3, 1.0, 0.0, 1.0], dtype=torch.float64)
    assert raft_expected_count_scale(accepted, group, eligible, own)[:5].tolist() == pytest.approx([1.0] * 5)
    # No estimate yet (NaN): the observed count, factor 1 for a prompt with an accepted sample.
    unknown = torch.tensor([float("nan"), 0.25, float("nan"), 0.9], dtype=torch.float64)
    assert raft_expected_count_scale(accepted, group, eligible, unknown).tolist() == pytest.approx(
        [1.0] * 3 + [4.0, 4.0] + [0.0, 0.0] + [0.0])
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        raft_expected_count_scale(accepted, group, eligible, torch.tensor([0.5, 1.5, 0.1, 0.1]))
    with pytest.raises(ValueError, match="the samples name prompt 3"):
        raft_expected_count_scale(accepted, group, eligible, torch.tensor([0.5, 0.5, 0.5]))


def test_config_needs_the_accepted_prompt_mean():
    from rl_service.config import load_config
    from rl_service.config.loading import ConfigError

    base = ["algorithm.name=raft++", "algorithm.accepted_normaliser=expected"]
    with pytest.raises(ConfigError, match="needs algorithm.aggregation: prompt_mean and algorithm.drop_rejected: true"):
        load_config(None, base)
    with pytest.raises(ConfigError, match="accepted_normaliser: not a setting of algorithm.name 'grpo'"):
        load_config(None, ["algorithm.accepted_normaliser=expected"])
    shipped_loss = base + ["algorithm.aggregation=prompt_mean", "algorithm.drop_rejected=true"]
    load_config(None, shipped_loss)
    # p̄ must come from earlier visits, not from a pilot whose samples the step trains on.
    with pytest.raises(ConfigError, match="moving averages \\(statistics.mode 'online'\\), not statistics.mode 'step_pilot'"):
        load_config(None, shipped_loss + ["statistics.allocation=gvm", "statistics.mode=step_pilot"])


def _captured_gradient(learner):
    """Replace the engine's step by a copy of the gradient (the weights stay put)."""
    parameters = [p for p in learner.engine.module.parameters() if p.requires_grad]
    captured = {}

    def capture(*args, **kwargs):
        captured["g"] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                   for p in parameters]).double()
        for parameter in parameters:
            parameter.grad = None

    learner.engine.step = capture
    return captured


def test_learner_gradient_is_the_per_prompt_rescaled_accepted_mean():
    # At the first update ρ = 1 and A = 1 on every kept token: the observed-count loss is −P_kept/B, the
    # expected-count loss −(1/B) Σ_i a_i/(n_i p̄_i). The gradient is Σ_i c_i · (prompt i's observed-count
    # gradient), each measured alone (the other prompts' samples rejected, so B stays 4).
    from conftest import arithmetic_requests
    from rl_service.config import load_config
    from rl_service.generation.hf_engine import HFGenerationEngine
    from rl_service.rollout import SamplingParams
    from rl_service.training.policy_learner import PolicyLearner

    rollout = HFGenerationEngine("builtin").generate(arithmetic_requests(4, 3, seed=5), SamplingParams(max_new_tokens=16), seed=0)
    prompt_of = list(rollout.request_index)
    rewards = [float((prompt == 1 and k % 3 == 0) or prompt == 3 and k % 3 != 2) for k, prompt in enumerate(prompt_of)]
    estimate = [0.5, 0.2, 0.4, 0.25]
    common = ["algorithm.name=raft++", "algorithm.aggregation=prompt_mean", "algorithm.drop_rejected=true",
              "learner.micro_batch_size=4"]
    expected_learner = PolicyLearner(load_config(None, common + ["algorithm.accepted_normaliser=expected"]))
    observed_learner = PolicyLearner(load_config(None, common))
    expected_grad, observed_grad = _captured_gradient(expected_learner), _captured_gradient(observed_learner)

    metrics = expected_learner.train_step(rollout, rewards, acceptance_estimates=estimate)
    factor = {1: 1 / (3 * 0.2), 3: 2 / (3 * 0.25)}
    assert metrics["loss"] == pytest.approx(-(factor[1] + factor[3]) / 4, rel=1e-6)
    reference = torch.zeros_like(expected_grad["g"])
    for prompt, c in factor.items():
        alone = [reward if p == prompt else 0.0 for reward, p in zip(rewards, prompt_of)]
        observed_learner.train_step(rollout, alone)
        reference += c * observed_grad["g"]
    # float32 gradients summed in another order: compare as vectors
    assert float((expected_grad["g"] - reference).norm() / reference.norm()) < 1e-5
    with pytest.raises(ValueError, match="acceptance estimate"):
        expected_learner.train_step(rollout, rewards)


def test_the_normaliser_reads_laplace_smoothed_counts_bounded_away_from_zero():
    from rl_service.statistics.prompt_stats import PromptStatistics

    stats = PromptStatistics(ema_weight=0.5)
    stats.update_acceptance([3, 5], [1, 4], [8, 8])
    for _ in range(10):   # prompt 3 never accepted again: its raw EMA of p decays towards 0
        stats.update_acceptance([3], [0], [8])
    estimate = stats.expected_count_acceptance([3, 5, 9])
    decay = 0.5 ** 10
    # EMA-weighted counts: a = 1·0.5^10, m = 8·0.5^10 + 8·(1 + 0.5 + … + 0.5^9); prompt 5: a = 4, m = 8
    m3 = 8 * decay + 8 * sum(0.5 ** k for k in range(10))
    assert estimate[:2].tolist() == pytest.approx([(decay + 1) / (m3 + 2), 5 / 10], rel=1e-6)
    assert stats.acceptance_rate_of([3])[0] == pytest.approx(0.125 * decay, rel=1e-5)   # the raw EMA: ~1e-4
    assert np.isnan(estimate[2])                                                          # never seen
