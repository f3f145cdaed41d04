"""Rounds of generation after a step's first: the step pilot (§GVM, ours) and DAPO dynamic sampling
(§DAPO). Both grow the step's rollout after its first round is scored, so they run in the driver
between collecting the step's batch and training on it.

- Step pilot: the first round gave each prompt `n_pilot` samples; the rest of each prompt's budget
  is spread by GVM on that pilot's p and G (`StatisticsActor.allocate_from_pilot`, §GVM.3–4) and
  generated. A prompt's new samples join its group (same request index), and all are trained on.
- Dynamic sampling: while fewer than `prompts_per_step` groups have a reward spread (or, with
  `dynamic_sampling_target: samples`, fewer than that many groups' worth of samples; under the round
  cap), the batch source hands out more prompts; the step trains on the first groups with a
  spread (`rl_service/algorithms/dynamic_sampling.py`). Every sample generated counts.
"""
from __future__ import annotations

import numpy as np

from rl_service.algorithms.acceptance import acceptance_threshold, accepted_per_prompt
from rl_service.algorithms.dynamic_sampling import groups_with_spread, selected_groups, selected_samples, train_mask
from rl_service.config.algorithm import GRPOConfig
from rl_service.driver.batch_source import per_prompt_mean
from rl_service.rollout import step_seed
from rl_service.driver.rollout_client import PhaseTimer, merge_scored


class StepRounds:
    def __init__(self, config, roles, client, batches, sampling):
        self.config, self.roles, self.client, self.batches, self.sampling = config, roles, client, batches, sampling
        self.accept_threshold = acceptance_threshold(config)

    def extend(self, step: int, launched, shard_refs, scored, timer: PhaseTimer):
        """The step's rounds after its first: the rest of the budget after a step pilot, then dynamic
        sampling. Returns (records, shard refs, scores, train mask or None, round metrics)."""
        records, metrics, mask = launched.records, dict(launched.allocation_metrics), None
        if self.batches.step_pilot:   # the rest of the step's budget, by GVM on its own pilot
            refs, more, spread = self.rest_after_pilot(step, 1, records, 0, shard_refs, scored, timer)
            shard_refs, scored = shard_refs + refs, merge_scored(scored, more)
            metrics.update(spread)
        algorithm = self.config.algorithm
        if isinstance(algorithm, GRPOConfig) and algorithm.dynamic_sampling:   # sync mode only: nothing was drawn ahead of it
            records, shard_refs, scored, mask, sampling_metrics = self.dynamic_sampling(step, records, shard_refs,
                                                                                        scored, timer)
            metrics.update(sampling_metrics)
        return records, shard_refs, scored, mask, metrics

    def _round(self, step: int, round_: int, records, counts, timer: PhaseTimer):
        """Generate and score `counts[i]` more samples of `records[i]`, with this round's own seed."""
        seed = step_seed(self.config.seed, step, 10 + round_)
        return self.client.rollout(records, counts, self.sampling, seed, timer)

    def rest_after_pilot(self, step: int, round_: int, records, first: int, pilot_refs, pilot, timer: PhaseTimer):
        """`records[first:]` had their pilot (`pilot_refs`, scores `pilot`): spread the rest of their
        budget by GVM on the pilot's p and G and generate it. Returns (refs, scores, spread metrics)."""
        import ray

        new = len(records) - first
        index = np.asarray(pilot["request_index"], dtype=np.int64) - first
        pilot_counts = np.bincount(index, minlength=new)
        budget = new * self.config.generator.samples_per_prompt - int(pilot_counts.sum())
        if budget <= 0 or not pilot_refs:
            return [], None, {}
        acceptance = accepted_per_prompt(pilot["rewards"], index, new, self.accept_threshold) / np.maximum(pilot_counts, 1)
        n_max = self.config.statistics.n_max
        with timer.phase("statistics"):
            norms = ray.get(self.roles.learner.grad_norms.remote(pilot_refs, pilot["rewards"]))
            rest, spread = ray.get(self.roles.statistics.allocate_from_pilot.remote(
                [record.prompt_id for record in records[first:]], acceptance.tolist(),
                per_prompt_mean(norms, index, new).tolist(), budget,
                None if n_max is None else max(n_max - int(pilot_counts.max()), 1)))
        refs, scored = self._round(step, round_, records, [0] * first + rest, timer)
        return refs, scored, spread

    def dynamic_sampling(self, step: int, records, shard_refs, scored, timer: PhaseTimer):
        """More rounds of prompts until `prompts_per_step` groups (or that many groups' worth of
        samples) have a reward spread, or the round cap. Returns the grown (records, shard_refs,
        scores), which samples train, and metrics."""
        groups = self.config.algorithm.dynamic_sampling_target == "groups"
        target = self.config.data.prompts_per_step * (1 if groups else self.config.generator.samples_per_prompt)

        def spread_and_filled(scored, num_prompts: int):
            spread = groups_with_spread(scored["rewards"], scored["request_index"], num_prompts)
            sizes = np.bincount(np.asarray(scored["request_index"], dtype=np.int64), minlength=num_prompts)
            return spread, sizes, int(spread.sum() if groups else sizes[spread].sum())

        rounds = 1
        spread, sizes, filled = spread_and_filled(scored, len(records))
        while filled < target and rounds < self.config.algorithm.dynamic_sampling_max_rounds:
            first = len(records)
            new_records, new_counts, _ = self.batches.next(step, timer)
            records = records + new_records
            refs, more = self._round(step, rounds, records, [0] * first + list(new_counts), timer)
            shard_refs, scored = shard_refs + refs, merge_scored(scored, more)
            if self.batches.step_pilot:
                refs, more, _ = self.rest_after_pilot(step, 100 + rounds, records, first, refs, more, timer)
                shard_refs, scored = shard_refs + refs, merge_scored(scored, more)
            rounds += 1
            spread, sizes, filled = spread_and_filled(scored, len(records))
        chosen = selected_groups(spread, target) if groups else selected_samples(spread, sizes, target)
        metrics = {"dynamic_sampling_rounds": float(rounds), "groups_with_spread": float(spread.sum()),
                   "trained_groups": float(chosen.sum())}
        return records, shard_refs, scored, train_mask(scored["request_index"], chosen), metrics
