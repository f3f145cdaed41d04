"""ALGORITHMS.md §GRPO.2, §GVM.7 and §RAFT advantages against hand-computed float64 values."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rl_service.algorithms import (
    grpo_advantages,
    raft_plus_plus_advantages,
    raft_plus_plus_keep_mask,
    zero_variance_groups,
)

F64 = torch.float64


def _t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def _close(actual, expected, tol=1e-12):
    torch.testing.assert_close(actual, _t(expected, actual.dtype), rtol=0, atol=tol)


def test_unequal_unsorted_groups_with_singleton():
    # Groups (by id): 2 -> samples 0,2,4 rewards 1,1,0 ; 0 -> samples 1,3,6 rewards 0,0,1 ; 5 -> sample 5.
    # Both 3-groups: mean 2/3 resp. 1/3, deviations ±1/3 and ∓2/3, sum of squares 2/3, Bessel var 1/3,
    # std 1/√3. Singleton (§GVM.7): mean 0, std 1.
    rewards = _t([1, 0, 1, 0, 0, 1, 1])
    group_index = torch.tensor([2, 0, 2, 0, 2, 5, 0])
    eps = 1e-6
    d = 1 / math.sqrt(3) + eps
    expected = [(1 / 3) / d, (-1 / 3) / d, (1 / 3) / d, (-1 / 3) / d, (-2 / 3) / d, 1 / (1 + eps), (2 / 3) / d]
    _close(grpo_advantages(rewards, group_index), expected)


def test_non_binary_rewards_and_custom_epsilon():
    # Group 7: {0.5, 2.0} mean 1.25, deviations ∓0.75, var 2·0.5625/1 = 1.125.
    # Group 3: {-1.0, 3.0} mean 1.0, deviations ∓2, var 8, std 2√2.
    rewards = _t([0.5, -1.0, 2.0, 3.0])
    group_index = torch.tensor([7, 3, 7, 3])
    eps = 1e-4
    s7, s3 = math.sqrt(1.125) + eps, 2 * math.sqrt(2) + eps
    expected = [-0.75 / s7, -2 / s3, 0.75 / s7, 2 / s3]
    _close(grpo_advantages(rewards, group_index, epsilon=eps), expected)


def test_scale_rewards_false_is_centering_only():
    # Dr. GRPO: A = r − mean; the singleton keeps mean 0, so A = r.
    rewards = _t([1, 0, 1, 0, 0, 0.7, 1])
    group_index = torch.tensor([2, 0, 2, 0, 2, 5, 0])
    expected = [1 / 3, -1 / 3, 1 / 3, -1 / 3, -2 / 3, 0.7, 2 / 3]
    _close(grpo_advantages(rewards, group_index, scale_rewards=False), expected)


@pytest.mark.parametrize("scale_rewards", [True, False])
def test_all_equal_groups_are_exactly_zero(scale_rewards):
    # 3 × 0.1 does not sum to exactly 0.3 in floating point: the naive (r − mean)/ε would leave ~1e-11.
    rewards = _t([1, 1, 1, 0, 0, 0.1, 0.1, 0.1, 1, 0])
    group_index = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    adv = grpo_advantages(rewards, group_index, scale_rewards=scale_rewards)
    assert torch.equal(adv[:8], torch.zeros(8, dtype=F64))
    assert adv[8] > 0 > adv[9]


def test_a_group_whose_variance_overflows_is_nan_not_zero():
    # (1e300)² overflows float64: std = inf gave A = 0 for the whole group, an update that learned
    # nothing and said nothing. NaN makes the learner skip the update and count it.
    rewards = _t([1e300, 0.0, 1.0, 0.0])
    adv = grpo_advantages(rewards, torch.tensor([0, 0, 1, 1]))
    assert torch.isnan(adv[:2]).all()
    _close(adv[2:], [0.5 / (math.sqrt(0.5) + 1e-6), -0.5 / (math.sqrt(0.5) + 1e-6)])
    _close(grpo_advantages(_t([1e300, 1e300]), torch.tensor([0, 0])), [0.0, 0.0])   # flat: still exactly 0


def test_size_one_groups_follow_verl():
    rewards = _t([0.0, 1.0, 0.7])
    group_index = torch.tensor([0, 1, 2])
    eps = 1e-6
    _close(grpo_advantages(rewards, group_index, epsilon=eps), [0.0, 1 / (1 + eps), 0.7 / (1 + eps)])
    _close(grpo_advantages(rewards, group_index, scale_rewards=False), [0.0, 1.0, 0.7])


def test_dtypes_and_empty_input():
    rewards32 = torch.tensor([1.0, 0.0, 1.0, 1.0])
    adv = grpo_advantages(rewards32, torch.tensor([0, 0, 1, 1]))
    assert adv.dtype == torch.float32
    d = 1 / math.sqrt(2) + 1e-6  # {1, 0}: mean 0.5, deviations ±0.5, var 0.5
    torch.testing.assert_close(adv, torch.tensor([0.5 / d, -0.5 / d, 0.0, 0.0]), rtol=0, atol=1e-6)
    assert grpo_advantages(torch.tensor([1, 0]), torch.tensor([0, 0])).dtype == torch.float32
    assert grpo_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)
    assert zero_variance_groups(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)


def _loop_reference(rewards: list[float], group_index: list[int], eps: float, scale: bool) -> list[float]:
    """Straight Python statement of §GRPO.2 / §GVM.7, one group at a time."""
    out = [0.0] * len(rewards)
    for g in set(group_index):
        members = [i for i, gi in enumerate(group_index) if gi == g]
        values = [rewards[i] for i in members]
        n = len(values)
        if n == 1:
            mean, std = 0.0, 1.0
        else:
            mean = sum(values) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        for i in members:
            if n > 1 and len(set(values)) == 1:
                out[i] = 0.0
            else:
                out[i] = (rewards[i] - mean) / (std + eps) if scale else rewards[i] - mean
    return out


@pytest.mark.parametrize("scale_rewards", [True, False])
def test_random_groups_match_loop_reference(scale_rewards):
    rng = random.Random(0)
    group_index, rewards = [], []
    for g in rng.sample(range(1000), 40):  # arbitrary ids, sizes 1..9
        for _ in range(rng.randint(1, 9)):
            group_index.append(g)
            rewards.append(rng.choice([0.0, 1.0, rng.random()]))
    order = list(range(len(rewards)))
    rng.shuffle(order)  # unsorted, interleaved groups
    rewards = [rewards[i] for i in order]
    group_index = [group_index[i] for i in order]
    adv = grpo_advantages(_t(rewards), torch.tensor(group_index), scale_rewards=scale_rewards)
    _close(adv, _loop_reference(rewards, group_index, 1e-6, scale_rewards), tol=1e-9)


def test_zero_variance_groups():
    rewards = _t([1, 1, 0, 1, 0.5, 0.5, 1, 0, 0])
    group_index = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4, 4])
    expected = [True, True, False, False, True, True, False, True, True]  # group 3 is a singleton
    assert zero_variance_groups(rewards, group_index).tolist() == expected


def test_raft_plus_plus_advantages_and_keep_mask():
    rewards = _t([1, 0, 1, 0.5, 0])
    assert raft_plus_plus_advantages(rewards).tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert raft_plus_plus_advantages(torch.tensor([1, 0])).dtype == torch.float32
    assert raft_plus_plus_keep_mask(rewards).tolist() == [True] * 5  # GVM code keeps rejected (A = 0)
    assert raft_plus_plus_keep_mask(rewards, drop_rejected=True).tolist() == [True, False, True, False, False]
