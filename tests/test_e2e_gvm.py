"""GVM end to end on real Ray + DeepSpeed + the shipped model: online EMAs and the offline pilot."""
from __future__ import annotations

import json

import pytest
from safetensors.numpy import load_file

from conftest import read_metrics, run_short_job

pytestmark = pytest.mark.slow


def test_online_gvm_raft_allocates_the_budget_and_tracks_grad_norms(tmp_path):
    # With §GVM.2's estimator (accepted_normaliser 'expected'): p̄ from the statistics role reaches the learner.
    summary = run_short_job(tmp_path, ["algorithm.name=raft++", "statistics.allocation=gvm", "statistics.n_pilot=2",
                                       "statistics.n_min=1", "data.arithmetic.num_train=8",
                                       "algorithm.aggregation=prompt_mean", "algorithm.drop_rejected=true",
                                       "algorithm.accepted_normaliser=expected"], steps=4)
    rows = [row for row in read_metrics(tmp_path) if "loss" in row or "skipped_step" in row]
    assert len(rows) == 4
    # Steps 1-2 see every prompt for the first time (no p̄: observed count); step 3 revisits them, and any
    # revisited prompt with an accepted sample reports a / (n p̄) > 0.
    assert "accepted_over_expected" not in rows[0]
    revisited = [row["accepted_over_expected"] for row in rows[2:] if "accepted_over_expected" in row]
    assert revisited and min(revisited) >= 0 and max(revisited) > 0
    for row in rows:
        assert row["completions"] == 4 * 4                   # same budget every step, however spread
        assert row["allocation_samples_min"] >= 1 and row["nonfinite_grad_norms_dropped"] == 0
    # 8 train prompts, 4 per step: step 3 revisits prompts, so the actor allocates from its statistics.
    # Recompute that allocation independently from the step-2 checkpoint's statistics and step 3's
    # prompts (the sampler's third batch), and compare with what the run logged.
    from rl_service.algorithms.gvm import allocation_spread_metrics, online_gvm_allocation
    from rl_service.data.sampler import PromptSampler
    from rl_service.statistics.prompt_stats import PromptStatistics

    sampler = PromptSampler(8, 4, seed=0)
    sampler.next_batch(), sampler.next_batch()
    step_3_prompts = sampler.next_batch()
    after_step_2 = PromptStatistics()
    after_step_2.load_state_dict(load_file(str(tmp_path / "checkpoints" / "step_2" / "statistics.safetensors")))
    counts = online_gvm_allocation(**after_step_2.allocation_inputs(step_3_prompts, laplace=False), budget=16,
                                   alpha=1e-3, beta=2.0, n_min=1, n_max=None, n_pilot=2)
    expected = allocation_spread_metrics(counts, after_step_2.acceptance_rate_of(step_3_prompts))
    assert {key: rows[2][key] for key in expected} == pytest.approx(expected)
    statistics = load_file(str(tmp_path / "checkpoints" / "step_4" / "statistics.safetensors"))
    accepted_any = statistics["accepted_ema_count"] > 0
    # Every prompt that ever had an accepted sample has a gradient norm EMA (§GVM.1, §GVM.6).
    assert ((statistics["grad_norm_count"] > 0) == accepted_any).all()
    assert (statistics["grad_norm_ema"][accepted_any] > 0).all()
    assert summary["completions"] == 4 * 16


def test_offline_pilot_counts_pilot_samples_and_spends_the_chunk_budget(tmp_path):
    summary = run_short_job(tmp_path, ["algorithm.name=grpo", "statistics.allocation=gvm",
                                       "statistics.mode=offline_pilot", "statistics.chunk_steps=2",
                                       "statistics.n_pilot=4"], steps=2)
    rows = [row for row in read_metrics(tmp_path) if "step_seconds" in row]
    # Step 1 carries the chunk's pilot (8 prompts × 4) on top of its own samples; the chunk's budget
    # (8 prompts × 4) is spread jointly, so the two steps' own samples sum to 32.
    pilot = 8 * 4
    assert rows[0]["completions"] + rows[1]["completions"] == pilot + 32
    assert summary["completions"] == pilot + 32


def test_step_pilot_spends_the_budget_after_its_own_pilot(tmp_path):
    summary = run_short_job(tmp_path, ["algorithm.name=grpo", "statistics.allocation=gvm", "statistics.mode=step_pilot",
                                       "statistics.n_pilot=2", "generator.samples_per_prompt=6",
                                       "algorithm.aggregation=prompt_mean"], steps=3)
    rows = [row for row in read_metrics(tmp_path) if "step_seconds" in row]
    ledger = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    for row, entry in zip(rows, ledger):
        # Pilot (4 prompts × 2) plus the rest spread by GVM: the step's budget, 4 × 6, exactly.
        assert row["completions"] == 24 and sum(entry["samples"]) == 24
        # Every prompt keeps its pilot; a prompt whose pilot accepted nothing gets no more (§GVM.4).
        assert min(entry["samples"]) >= 2 and row["allocation_samples_min"] >= 0
    assert summary["completions"] == 3 * 24


def test_online_gvm_allocates_prompts_never_seen_from_their_groups_statistics(tmp_path):
    # 64 prompts, 4 a step: no prompt comes back within the run, so per-prompt GVM would pilot every prompt
    # (uniform); with group statistics a new prompt of a level already seen is allocated like a seen one.
    from rl_service.algorithms.gvm import online_gvm_allocation
    from rl_service.config import load_config
    from rl_service.statistics.prompt_stats import GroupStatistics, PromptStatistics
    from rl_service.tasks import load_task
    from conftest import REPO, short_run_overrides

    extra = ["algorithm.name=grpo", "statistics.allocation=gvm", "statistics.unseen_prompts=group",
             "statistics.n_pilot=2", "statistics.n_min=1"]
    run_short_job(tmp_path, extra, steps=3)
    ledger = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert len({prompt for entry in ledger for prompt in entry["prompt_ids"]}) == 12   # never revisited
    # Step 3's allocation, recomputed from the step-2 checkpoint (prompt and group stores) and the task.
    state = load_file(str(tmp_path / "checkpoints" / "step_2" / "statistics.safetensors"))
    prompts, groups = PromptStatistics(), GroupStatistics()
    prompts.load_state_dict({key: value for key, value in state.items() if not key.startswith("group.")})
    groups.load_state_dict({key[len("group."):]: value for key, value in state.items() if key.startswith("group.")})
    task = load_task(load_config(REPO / "configs" / "quickstart.yaml", short_run_overrides(3) + extra))
    group_of = {record.prompt_id: record.group for record in task.train}
    step_3 = ledger[2]["prompt_ids"]
    group = groups.allocation_inputs_of_groups([group_of[prompt] for prompt in step_3], laplace=False)
    assert group["seen"].any() and not prompts.allocation_inputs(step_3, laplace=False)["seen"].any()
    counts = online_gvm_allocation(**prompts.allocation_inputs(step_3, laplace=False), budget=16, n_min=1,
                                   n_pilot=2, group=group)
    assert ledger[2]["samples"] == counts.tolist()
    assert sum(ledger[2]["samples"]) == 16


def dynamic_sampling_steps(tmp_path, extra: list[str], steps: int) -> list[tuple[dict, dict, int]]:
    """Run a dynamic-sampling job (4 prompts × 4 samples a round, at most 3 rounds) and check what
    holds for either target: every round's samples are generated and counted. Returns each step's
    (metrics row, ledger entry, rounds)."""
    summary = run_short_job(tmp_path, ["algorithm.name=grpo", "algorithm.dynamic_sampling=true",
                                       "algorithm.dynamic_sampling_max_rounds=3", *extra], steps=steps)
    rows = [row for row in read_metrics(tmp_path) if "step_seconds" in row]
    ledger = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert sum(row["completions"] for row in rows) == summary["completions"]
    steps_seen = []
    for row, entry in zip(rows, ledger):
        rounds = int(row["dynamic_sampling_rounds"])
        assert 1 <= rounds <= 3 and len(entry["prompt_ids"]) == 4 * rounds
        assert row["completions"] == 16 * rounds == sum(entry["samples"])   # dropped groups still cost
        steps_seen.append((row, entry, rounds))
    return steps_seen


def test_dynamic_sampling_by_samples_with_gvm_fills_the_sample_budget(tmp_path):
    # GVM online gives unequal groups (n_min 2 .. n_max 12); the step fills 4 prompts × 4 samples = 16
    # samples in groups with a spread, whatever the number of groups.
    steps = dynamic_sampling_steps(tmp_path, ["algorithm.dynamic_sampling_target=samples",
                                              "algorithm.aggregation=prompt_mean", "statistics.allocation=gvm",
                                              "statistics.n_pilot=2", "statistics.n_min=2", "statistics.n_max=12",
                                              "data.arithmetic.num_train=8"], steps=5)
    for row, entry, rounds in steps:
        assert row["trained_samples"] >= 16 or rounds == 3                   # short only at the round cap
        assert row["trained_samples"] < 16 + max(entry["samples"])            # stops at the group that fills it
        assert row["trained_groups"] <= row["groups_with_spread"]
    assert any(len(set(entry["samples"])) > 1 for _, entry, _ in steps)      # the groups really were unequal


def test_dynamic_sampling_counts_every_sample_and_trains_groups_with_a_spread(tmp_path):
    for row, _, rounds in dynamic_sampling_steps(tmp_path, [], steps=3):
        assert row["trained_groups"] == min(row["groups_with_spread"], 4)
        assert row["trained_groups"] == 4 or rounds == 3                      # short only at the round cap
        assert row["trained_samples"] == 4 * row["trained_groups"]
