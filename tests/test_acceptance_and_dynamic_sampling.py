"""One definition of acceptance (§GVM.1), the §GVM.6 online policy as a pure function, and §DAPO's
dynamic-sampling selection, each against hand cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rl_service.algorithms.acceptance import acceptance_threshold, accepted, accepted_per_prompt
from rl_service.algorithms.advantages import raft_plus_plus_advantages
from rl_service.algorithms.dynamic_sampling import groups_with_spread, selected_groups, selected_samples, train_mask
from rl_service.algorithms.gvm import gvm_allocation, online_gvm_allocation
from rl_service.statistics.prompt_stats import PromptStatistics


def test_acceptance_counts_samples_not_reward_sums():
    # A custom reward of 6.0 used to be fed in as "6 accepted samples" and raised at the next allocation.
    rewards = [6.0, 0.4, 0.0, 0.7]
    assert accepted_per_prompt(rewards, [0, 0, 1, 1], 2, threshold=0.5).tolist() == [1, 1]
    assert accepted_per_prompt(rewards, [0, 0, 1, 1], 2).tolist() == [1, 0]          # verifier: reward ≥ 1
    stats = PromptStatistics()
    stats.update_acceptance([0, 1], accepted_per_prompt(rewards, [0, 0, 1, 1], 2), [2, 2])
    assert stats.acceptance_rate_of([0, 1]).tolist() == [0.5, 0.0]
    with pytest.raises(ValueError, match=r"accepted\[0\] = 6.0"):
        stats.update_acceptance([0, 1], [6.0, 0.4], [4, 4])
    # A format bonus (0.1 for a well-formed wrong answer) is not an acceptance.
    assert accepted([0.1, 0.1, 1.1], 1.0).tolist() == [False, False, True]
    # The same rule on tensors, and RAFT++'s advantages follow it.
    assert accepted(torch.tensor([0.3, 0.7]), 0.5).tolist() == [False, True]
    assert raft_plus_plus_advantages(torch.tensor([0.3, 0.7, 1.0]), 0.5).tolist() == [0.0, 1.0, 1.0]
    assert raft_plus_plus_advantages(torch.tensor([0.0, 1.0])).tolist() == [0.0, 1.0]


def test_acceptance_threshold_comes_from_the_config_and_custom_rewards_must_set_it(tmp_path):
    from rl_service.config import load_config
    from rl_service.config.loading import ConfigError

    quickstart = "configs/quickstart.yaml"
    assert acceptance_threshold(load_config(quickstart)) == 1.0
    assert acceptance_threshold(load_config(quickstart, ["statistics.accept_threshold=0.5"])) == 0.5
    reward = tmp_path / "reward.py"
    reward.write_text("def fn(completion, answer):\n    return 0.0\n")
    with pytest.raises(ConfigError, match="statistics.accept_threshold is required"):
        load_config(quickstart, [f"reward.custom={reward}:fn", "statistics.allocation=gvm"])
    with pytest.raises(ConfigError, match="statistics.accept_threshold is required"):
        load_config(quickstart, [f"reward.custom={reward}:fn", "algorithm.name=raft++"])
    load_config(quickstart, [f"reward.custom={reward}:fn", "statistics.allocation=gvm", "statistics.accept_threshold=0.5"])
    with pytest.raises(ConfigError, match="schedule.mode 'sync'"):
        load_config(quickstart, ["algorithm.dynamic_sampling=true"])
    with pytest.raises(ConfigError, match=r"algorithm.dynamic_sampling: not a setting of algorithm.name .raft\+\+."):
        load_config(quickstart, ["algorithm.dynamic_sampling=true", "schedule.mode=sync", "algorithm.name=raft++"])


def test_online_policy_hand_case():
    seen = [True, True, True, False]
    p = [1 / 8, 7 / 8, 0.0, 0.0]
    g = [3.0, 1.0, 0.0, 0.0]
    has_g = [True, True, False, False]
    counts = online_gvm_allocation(seen, p, g, has_g, 32, n_min=1, n_pilot=4)
    assert counts[3] == 4 and counts.sum() == 32
    # Prompt 2 has no G: it takes the median of the others' (2.0), but p = 0 gives it weight 0 (n_min = 1).
    assert counts[:3].tolist() == gvm_allocation(p[:3], [3.0, 1.0, 2.0], 28, n_min=1).tolist()
    # w = G/√(p + α/p): prompt 0 ≈ 3/√0.133 = 8.2, prompt 1 ≈ 1/√0.876 = 1.07 → 27 · (8.2, 1.07)/9.3 + n_min.
    assert counts[:3].tolist() == [24, 3, 1]
    # A budget too small to pilot every new prompt pilots as many as fit, uniformly, seen prompts get 0.
    assert online_gvm_allocation([False, False, True], [0, 0, 0.5], [0, 0, 1], [False, False, True], 5,
                                 n_pilot=4).tolist() == [3, 2, 0]
    assert online_gvm_allocation([False, False], [0, 0], [0, 0], [False, False], 9, n_pilot=2).tolist() == [5, 4]
    with pytest.raises(ValueError, match="one shape"):
        online_gvm_allocation([True], [0.5, 0.5], [1.0], [True], 4)


def test_dynamic_sampling_keeps_the_first_groups_with_a_spread():
    rewards = [1, 1, 0, 1, 0, 0, 1, 0, 1]
    index = [0, 0, 1, 1, 2, 2, 3, 3, 4]            # prompt 4 has one sample: no spread possible
    spread = groups_with_spread(rewards, index, 6)  # prompt 5 has no sample
    assert spread.tolist() == [False, True, False, True, False, False]
    chosen = selected_groups(spread, 1)
    assert chosen.tolist() == [False, True, False, False, False, False]
    assert train_mask(index, chosen) == [False, False, True, True, False, False, False, False, False]
    assert selected_groups(spread, 5).sum() == 2      # fewer than the target: all of them
    assert groups_with_spread([0.5, 0.5000001], [0, 0], 1).tolist() == [True]
    with pytest.raises(ValueError):
        groups_with_spread([1, 0], [0], 1)
    assert np.array_equal(groups_with_spread([], [], 2), [False, False])


def test_prompt_mean_aggregation_weighs_prompts_equally_whatever_their_sample_counts():
    from rl_service.algorithms.policy_loss import PolicyLossConfig, loss_normalizer_for, policy_loss, prompt_mean_weights

    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.float64)
    groups = torch.tensor([7, 7, 7, 3, 9])            # prompt 7: 3 samples, 6 tokens; prompt 3: 4 tokens; 9: none
    weights = prompt_mean_weights(mask, groups)
    assert weights.tolist() == pytest.approx([1 / 12, 1 / 12, 1 / 12, 1 / 8, 0.0])
    logprobs = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    old = logprobs.detach() + 0.1 * torch.randn(5, 4, dtype=torch.float64)
    advantages = torch.tensor([1.0, -0.5, 2.0, 0.7, 3.0], dtype=torch.float64)
    config = PolicyLossConfig(clip_low=0.2, clip_high=0.28, aggregation="prompt_mean")
    assert loss_normalizer_for(mask, "prompt_mean") == 1.0
    loss, _ = policy_loss(logprobs, old, advantages, mask, config, sequence_weights=weights)
    # Independent float64 reference: per-token clipped surrogate, token mean within each prompt, mean over prompts.
    ratio = torch.exp(logprobs - old)
    surrogate = torch.minimum(ratio * advantages[:, None], ratio.clamp(0.8, 1.28) * advantages[:, None]) * mask
    expected = -0.5 * (surrogate[:3].sum() / 6 + surrogate[3].sum() / 4)
    assert float(loss) == pytest.approx(float(expected), rel=1e-12)
    # Micro-batches with the mini-batch's weights sum to the mini-batch loss and gradient.
    (grad_full,) = torch.autograd.grad(loss, logprobs)
    parts = [policy_loss(logprobs[rows], old[rows], advantages[rows], mask[rows], config,
                         sequence_weights=weights[rows])[0] for rows in (slice(0, 2), slice(2, 5))]
    (grad_parts,) = torch.autograd.grad(parts[0] + parts[1], logprobs)
    assert float(parts[0] + parts[1]) == pytest.approx(float(loss), rel=1e-12)
    assert torch.allclose(grad_parts, grad_full, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="sequence_weights"):
        policy_loss(logprobs, old, advantages, mask, config)
    # A prompt whose samples were all rejected (no row left) still counts in the mean over prompts.
    assert prompt_mean_weights(mask, groups, absent_prompts=1.0).tolist() == pytest.approx([1 / 18] * 3 + [1 / 12, 0.0])


def test_raft_prompt_mean_divides_by_every_prompt_of_the_batch_as_gvm2_does():
    # §GVM.2's estimator is (1/B) Σ_i (mean over prompt i's accepted samples): a prompt with no
    # accepted sample adds 0 but still counts in B. At the first update the ratio is exactly 1 and
    # A = 1 on every kept token, so each prompt with an accepted sample adds -1 and the loss is -P_kept/B.
    from conftest import arithmetic_requests
    from rl_service.config import load_config
    from rl_service.generation.hf_engine import HFGenerationEngine
    from rl_service.rollout import SamplingParams
    from rl_service.training.policy_learner import PolicyLearner

    rollout = HFGenerationEngine("builtin").generate(arithmetic_requests(4, 3, seed=5), SamplingParams(max_new_tokens=16), seed=0)
    rewards = [float(prompt in (1, 3) and k % 3 == 0) for k, prompt in enumerate(rollout.request_index)]
    learner = PolicyLearner(load_config(None, ["algorithm.name=raft++", "algorithm.aggregation=prompt_mean",
                                               "algorithm.drop_rejected=true", "learner.micro_batch_size=4"]))
    metrics = learner.train_step(rollout, rewards)
    assert metrics["all_rejected_prompts"] == 2 and metrics["trained_samples"] == 2
    assert metrics["loss"] == pytest.approx(-2 / 4, abs=1e-6)


def test_the_learner_accepts_exactly_the_samples_the_driver_and_statistics_accept():
    # A reward-model score one float32 step below the threshold: the learner read rewards as float32,
    # trained such a sample with A = 1 while the statistics (float64) counted it as rejected.
    from conftest import arithmetic_requests
    from rl_service.config import load_config
    from rl_service.generation.hf_engine import HFGenerationEngine
    from rl_service.rollout import SamplingParams
    from rl_service.training.policy_learner import PolicyLearner

    rollout = HFGenerationEngine("builtin").generate(arithmetic_requests(2, 4, seed=5), SamplingParams(max_new_tokens=8), seed=0)
    just_below, at = 0.69999999, 0.7   # float32 rounds both to 0.699999988, below 0.7
    rewards = [(just_below, at, 0.5, 0.0)[k % 4] for k in range(len(rollout))]
    learner = PolicyLearner(load_config(None, ["algorithm.name=raft++", "algorithm.drop_rejected=true",
                                               "statistics.accept_threshold=0.7", "learner.micro_batch_size=4"]))
    metrics = learner.train_step(rollout, rewards)
    assert accepted(rewards, 0.7).sum() == len(rollout) // 4
    assert metrics["trained_samples"] == len(rollout) // 4


def test_grpo_zero_variance_filter_reports_how_many_groups_it_dropped():
    # §GRPO.2: filter_zero_variance_groups drops groups whose rewards are all equal "and reports how
    # many were dropped". Prompts 0 (all rejected) and 2 (all accepted) are flat; 1 and 3 have a spread.
    from conftest import arithmetic_requests
    from rl_service.config import load_config
    from rl_service.generation.hf_engine import HFGenerationEngine
    from rl_service.rollout import SamplingParams
    from rl_service.training.policy_learner import PolicyLearner

    rollout = HFGenerationEngine("builtin").generate(arithmetic_requests(4, 3, seed=5), SamplingParams(max_new_tokens=16), seed=0)
    rewards = [float(prompt == 2 or (prompt in (1, 3) and k % 3 == 0)) for k, prompt in enumerate(rollout.request_index)]
    learner = PolicyLearner(load_config(None, ["algorithm.filter_zero_variance_groups=true",
                                               "learner.micro_batch_size=4"]))
    metrics = learner.train_step(rollout, rewards)
    assert metrics["zero_variance_groups_dropped"] == 2 and metrics["trained_samples"] == 6
    assert metrics["zero_variance_sample_fraction"] == pytest.approx(0.5)


def test_dynamic_sampling_by_samples_fills_a_sample_budget_and_equals_the_group_count_on_equal_groups():
    spread = np.array([False, True, True, False, True, True])
    sizes = np.array([2, 2, 12, 8, 3, 6])
    # Draw order: prompt 1 (2 samples, 2 so far), prompt 2 (12 → 14 ≥ 8): the group that reaches the target is in.
    assert selected_samples(spread, sizes, 8).tolist() == [False, True, True, False, False, False]
    assert selected_samples(spread, sizes, 15).tolist() == [False, True, True, False, True, False]
    assert selected_samples(spread, sizes, 100).tolist() == spread.tolist()      # short: every spread group
    assert not selected_samples(spread, sizes, 0).any()
    rng = np.random.default_rng(0)
    for _ in range(50):   # equal groups of k: a budget of t·k samples picks what a count of t groups picks
        spread, k, t = rng.random(20) < 0.5, int(rng.integers(2, 9)), int(rng.integers(1, 12))
        assert np.array_equal(selected_samples(spread, np.full(20, k), t * k), selected_groups(spread, t))
    with pytest.raises(ValueError, match="3 group sizes for 2 groups"):
        selected_samples([True, False], [1, 2, 3], 4)
