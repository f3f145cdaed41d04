"""Per-prompt acceptance EMAs, uniform allocation, and the flat weight buffer."""
import numpy as np
import pytest
import torch

from rl_service.statistics.prompt_stats import PromptStatistics, uniform_allocation
from rl_service.weights.flat import flatten_named_tensors, load_flat_weights_


def test_uniform_allocation_spreads_and_preserves_budget():
    assert uniform_allocation(4, 32) == [8, 8, 8, 8]
    assert uniform_allocation(3, 10) == [4, 3, 3]
    assert sum(uniform_allocation(7, 1000)) == 1000
    with pytest.raises(ValueError):
        uniform_allocation(0, 8)


def test_acceptance_ema_hand_computed():
    stats = PromptStatistics(ema_weight=0.5, capacity=2)
    stats.update_acceptance(np.array([3, 7]), np.array([2, 0]), np.array([8, 8]))
    # First visit takes the batch rate: 2/8 and 0/8.
    assert stats.get("acceptance_rate_ema", [3])[0] == pytest.approx(0.25)
    stats.update_acceptance(np.array([3]), np.array([6]), np.array([8]))
    # 0.5 * 0.25 + 0.5 * 0.75 = 0.5
    assert stats.get("acceptance_rate_ema", [3])[0] == pytest.approx(0.5)
    assert stats.get("visit_count", [3, 7]).tolist() == [2, 1] and stats.get("sample_count", [3])[0] == 16
    summary = stats.summary()
    assert summary["prompts_seen"] == 2 and summary["never_accepted_fraction"] == 0.5
    with pytest.raises(ValueError, match="once"):
        stats.update_acceptance(np.array([1, 1]), np.array([0, 0]), np.array([1, 1]))


def test_moving_averages_are_float64_exact():
    # §GVM.6's p̃ ← (1−λ)p̃ + λp̂ and the same rule for G̃, against Python floats (float64) to the last bit.
    stats = PromptStatistics(ema_weight=0.5, capacity=1)
    stats.update_acceptance([5], [1], [3])
    stats.update_acceptance([5], [3], [4])
    stats.update_grad_norms([5], [1 / 3])
    stats.update_grad_norms([5], [0.1])
    assert stats.get("acceptance_rate_ema", [5])[0] == 0.5 * (1 / 3) + 0.5 * (3 / 4)
    assert stats.get("grad_norm_ema", [5])[0] == 0.5 * (1 / 3) + 0.5 * 0.1
    assert stats.acceptance_rate_of([5]).dtype == np.float64


def test_statistics_state_round_trip():
    stats = PromptStatistics(ema_weight=0.3)
    stats.update_acceptance(np.array([5, 2000]), np.array([1, 3]), np.array([4, 4]))
    restored = PromptStatistics(ema_weight=0.9)
    restored.load_state_dict(stats.state_dict())
    assert restored.ema_weight == pytest.approx(0.3)
    for name in ("acceptance_rate_ema", "visit_count", "sample_count"):
        np.testing.assert_array_equal(restored.get(name, range(2001)), stats.get(name, range(2001)))
    # Ids are mapped to slots, not used as indices: the largest id costs one slot.
    huge = PromptStatistics()
    huge.update_acceptance([2**40 - 1, 3], [1, 0], [4, 4])
    assert huge.size == 2 and len(huge.visit_count) <= 1024
    assert huge.get("acceptance_rate_ema", [2**40 - 1, 3, 5]).tolist() == [0.25, 0.0, 0.0]
    again = PromptStatistics()
    again.load_state_dict(huge.state_dict())
    assert again.get("visit_count", [3, 2**40 - 1]).tolist() == [1, 1]


def test_flat_weights_round_trip_mixed_dtypes_in_place():
    torch.manual_seed(0)
    source = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    source[1].to(torch.bfloat16)
    target = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    target[1].to(torch.bfloat16)
    storage_before = target[0].weight.data_ptr()
    flat = flatten_named_tensors(source.named_parameters(), version=7)
    assert flat.version == 7 and flat.buffer.dtype == np.uint8
    assert flat.num_bytes >= sum(p.numel() * p.element_size() for p in source.parameters())
    load_flat_weights_(target, flat)
    for (name, a), (_, b) in zip(source.named_parameters(), target.named_parameters()):
        assert torch.equal(a, b), name
    assert target[0].weight.data_ptr() == storage_before  # loaded in place, no reallocation
    with pytest.raises(KeyError):
        load_flat_weights_(torch.nn.Linear(3, 5), flat)


def test_bucket_layout_planned_from_shapes_matches_the_packed_buffer():
    """The collective transport's receivers allocate from `BucketLayout.plan` (shapes only); the
    sender packs with `flatten_named_tensors`: the two must agree byte for byte, odd sizes included."""
    from rl_service.weights.collective import BucketLayout

    named = [("a", torch.randn(3, 5)), ("b", torch.randn(7).to(torch.bfloat16)), ("c", torch.randn(1, 3)),
             ("d", torch.arange(3, dtype=torch.int64)), ("e", torch.empty(0, 2)), ("f", torch.randn(()))]
    packed = BucketLayout.of(flatten_named_tensors(named, 1))
    assert BucketLayout.plan((name, tensor.shape, tensor.dtype) for name, tensor in named) == packed
    assert packed.offsets == (0, 60, 76, 88, 112, 112) and packed.num_bytes == 116


def test_grad_norm_ema_skips_nan_and_counts_infinite():
    stats = PromptStatistics(ema_weight=0.5, capacity=4)
    # NaN: the prompt had no accepted sample (nothing to fold in); inf: a numerical failure (counted).
    assert stats.update_grad_norms([1, 2, 3], [2.0, float("nan"), float("inf")]) == 1
    assert stats.get("grad_norm_ema", [1])[0] == pytest.approx(2.0) and stats.get("grad_norm_count", [2])[0] == 0
    assert stats.get("grad_norm_count", [3])[0] == 0 and stats.nonfinite_grad_norms == 1
    stats.update_grad_norms([1], [4.0])
    assert stats.get("grad_norm_ema", [1])[0] == pytest.approx(0.5 * 2.0 + 0.5 * 4.0)


def test_discounted_counts_give_laplace_smoothed_acceptance():
    stats = PromptStatistics(ema_weight=0.5)
    stats.update_acceptance([0], [2], [4])
    stats.update_acceptance([0], [4], [4])
    # a = 0.5·2 + 4 = 5, m = 0.5·4 + 4 = 6 → (5 + 1)/(6 + 2)
    smoothed = stats.acceptance_for_allocation(np.array([0]), laplace=True)
    assert smoothed[0] == pytest.approx(6 / 8)
    assert stats.acceptance_for_allocation(np.array([0]), laplace=False)[0] == pytest.approx(0.75)


def test_online_gvm_allocation_pilots_new_prompts_and_spends_the_budget():
    from rl_service.algorithms.gvm import gvm_allocation

    from rl_service.algorithms.gvm import online_gvm_allocation

    stats = PromptStatistics(ema_weight=1.0)
    stats.update_acceptance([10, 11, 12], [1, 7, 0], [8, 8, 8])
    stats.update_grad_norms([10, 11], [3.0, 1.0])
    kwargs = dict(alpha=1e-3, beta=2.0, n_min=1, n_max=None, n_pilot=4)

    def allocate(ids, budget):
        return online_gvm_allocation(**stats.allocation_inputs(ids, laplace=False), budget=budget, **kwargs)
    # All unseen: the budget spreads uniformly.
    assert allocate([20, 21], 16).tolist() == [8, 8]
    counts = allocate([10, 11, 12, 99], 32)
    assert counts[3] == 4 and counts.sum() == 32          # the unseen prompt gets its pilot
    # Prompt 12 never accepted (p = 0 → weight 0) but n_min keeps it visible; prompt 12 has no G and
    # takes the batch median of G; the rest follows §GVM.3 exactly.
    expected = gvm_allocation([1 / 8, 7 / 8, 0.0], [3.0, 1.0, 2.0], 28, n_min=1)
    assert counts[:3].tolist() == expected.tolist()
    assert counts[0] > counts[1] >= counts[2] == 1        # hard prompt with big G gets most


def test_statistics_round_trip_keeps_grad_norms():
    stats = PromptStatistics(ema_weight=0.3)
    stats.update_acceptance([1], [1], [2])
    stats.update_grad_norms([1, 7], [0.5, float("inf")])
    restored = PromptStatistics()
    restored.load_state_dict(stats.state_dict())
    assert restored.get("grad_norm_ema", [1])[0] == pytest.approx(0.5) and restored.nonfinite_grad_norms == 1
    assert restored.get("accepted_ema_count", [1])[0] == pytest.approx(1.0)


def test_per_prompt_mean_of_accepted_norms_keeps_failures_visible():
    from rl_service.driver.batch_source import per_prompt_mean

    nan, inf = float("nan"), float("inf")
    # prompt 0: two accepted (1, 3) and a rejected (NaN); prompt 1: none accepted; prompt 2: a failure.
    means = per_prompt_mean([1.0, nan, 3.0, nan, 2.0, inf], np.array([0, 0, 0, 1, 2, 2]), 4)
    assert means[0] == pytest.approx(2.0) and np.isnan(means[1]) and np.isinf(means[2]) and np.isnan(means[3])
    stats = PromptStatistics()
    assert stats.update_grad_norms([10, 11, 12, 13], means) == 1     # the failure is counted, not averaged
    assert stats.get("grad_norm_count", [10, 11, 12, 13]).tolist() == [1, 0, 0, 0]


def test_length_grouped_micro_batches_cover_each_row_once_and_pad_less():
    import torch

    from rl_service.training.batch import TrainingBatch, micro_batches

    lengths = torch.tensor([5, 9, 2, 9, 7, 3, 8, 4, 6, 1])
    width = int(lengths.max())
    attention = (torch.arange(width)[None, :] < lengths[:, None]).long()
    batch = TrainingBatch(attention.clone(), attention, attention[:, 1:].float(), attention[:, 1:].float(),
                          torch.zeros(10), torch.zeros(10, dtype=torch.long))
    rows = torch.tensor([0, 2, 4, 5, 6, 7, 8, 9])            # a mini-batch: rows 1 and 3 are elsewhere
    grouped = micro_batches(batch, rows, 3, group_by_length=True)
    assert sorted(torch.cat(grouped).tolist()) == rows.tolist()
    assert [lengths[micro].tolist() for micro in grouped] == [[8, 7, 6], [5, 4, 3], [2, 1]]
    in_order = micro_batches(batch, rows, 3, group_by_length=False)
    assert [micro.tolist() for micro in in_order] == [[0, 2, 4], [5, 6, 7], [8, 9]]

    def padded_positions(micros):
        return sum(batch.select(micro).attention_mask.numel() for micro in micros)
    assert padded_positions(grouped) == 8 * 3 + 5 * 3 + 2 * 2 < padded_positions(in_order) == 7 * 3 + 8 * 3 + 6 * 2
