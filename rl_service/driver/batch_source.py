"""Where each step's prompts and per-prompt sample counts come from (driver side).

Three sources, one interface (`next(step, timer) -> (records, counts, allocation_metrics)`):

- `OnlineBatches` — the default. Each step takes the sampler's next batch and asks the statistics
  actor how to spread the step's budget (`prompts_per_step × samples_per_prompt`): uniform, or
  GVM from the per-prompt moving averages (ALGORITHMS.md §GVM.6, ours).
- `StepPilotBatches` — GVM with the statistics measured when they are needed (ours): the step's
  first round is a pilot of `n_pilot` samples per prompt; the driver then spreads the rest of the
  budget by GVM on the pilot's p and G (`Trainer._spend_rest_after_pilot`) and trains on all of it.
- `OfflinePilotBatches` — the GVM paper's two-stage procedure (§GVM.5), for a faithful comparison:
  every `chunk_steps` steps it takes the next chunk of prompts, samples a pilot of `n_pilot` per
  prompt at `pilot_temperature`, measures p and G from the pilot alone (no moving average), spreads
  the chunk's whole budget jointly, then serves the chunk batch by batch. Pilot samples are not
  trained on, but they are generated, so they count in the step's completions.
"""
from __future__ import annotations

from collections import deque

import numpy as np

from rl_service.algorithms.acceptance import acceptance_threshold, accepted_per_prompt
from rl_service.algorithms.gvm import allocation_spread_metrics
from rl_service.config import JobConfig
from rl_service.rollout import SamplingParams, step_seed


def per_prompt_mean(values: list[float], request_index: np.ndarray, num_prompts: int) -> np.ndarray:
    """Mean of the finite `values` of each prompt's samples; NaN for a prompt with none (§GVM.1:
    G is a mean over accepted samples, and rejected ones carry NaN)."""
    values = np.asarray(values, dtype=np.float64)
    index = np.asarray(request_index, dtype=np.int64)
    finite = np.isfinite(values)
    sums = np.bincount(index[finite], weights=values[finite], minlength=num_prompts)
    counts = np.bincount(index[finite], minlength=num_prompts)
    means = np.full(num_prompts, np.nan)
    np.divide(sums, counts, out=means, where=counts > 0)
    # An infinite norm is a failure the statistics actor must count, not a value to average away.
    infinite = np.bincount(index[np.isinf(values)], minlength=num_prompts) > 0
    means[infinite] = np.inf
    return means


def groups_of(config: JobConfig, records) -> list[str | None] | None:
    """Each record's group for the statistics role, when it keeps group statistics (else None)."""
    return [record.group for record in records] if config.statistics.unseen_prompts == "group" else None


class OnlineBatches:
    step_pilot = False

    def __init__(self, config: JobConfig, task, sampler, roles):
        self.config, self.task, self.sampler, self.roles = config, task, sampler, roles
        self.wants_grad_norms = config.statistics.allocation == "gvm"

    def next(self, step: int, timer):
        import ray

        records = [self.task.train[index] for index in self.sampler.next_batch()]
        budget = len(records) * self.config.generator.samples_per_prompt
        with timer.phase("statistics"):
            counts, spread = ray.get(self.roles.statistics.allocate.remote(
                [r.prompt_id for r in records], budget, groups_of(self.config, records)))
        return records, counts, spread

    def pop_pilot_completions(self) -> int:
        return 0   # no pilot: every sample generated is a training sample

    def state_dict(self) -> dict | None:
        return None   # nothing beyond the sampler's cursor

    def load_state_dict(self, state: dict | None, records_by_id: dict) -> None:
        pass


class StepPilotBatches(OnlineBatches):
    """Step pilot (ours): `n_pilot` per prompt now, the rest of the budget after the pilot is scored."""
    step_pilot = True

    def __init__(self, config: JobConfig, task, sampler, roles):
        super().__init__(config, task, sampler, roles)
        self.wants_grad_norms = False   # G comes from each step's own pilot, not from the moving averages

    def next(self, step: int, timer):
        records = [self.task.train[index] for index in self.sampler.next_batch()]
        per_prompt = min(self.config.statistics.n_pilot, self.config.generator.samples_per_prompt)
        return records, [per_prompt] * len(records), {}


class OfflinePilotBatches:
    wants_grad_norms = False   # p and G come from the pilot; training batches leave them alone
    step_pilot = False

    def __init__(self, config: JobConfig, task, sampler, roles, rollout):
        self.config, self.task, self.sampler, self.roles, self.rollout = config, task, sampler, roles, rollout
        self.queue: deque = deque()
        self.pilot_completions = 0

    def next(self, step: int, timer):
        if not self.queue:
            self._pilot_next_chunk(step, timer)
        return self.queue.popleft()

    def pop_pilot_completions(self) -> int:
        pilot, self.pilot_completions = self.pilot_completions, 0
        return pilot

    def state_dict(self) -> dict:
        """The chunk's batches not handed out yet, with their counts: a checkpoint inside a chunk
        keeps them, since its pilot ran on weights (and drew prompts) the checkpoint no longer has."""
        return {"queue": [{"prompt_ids": [record.prompt_id for record in batch], "counts": [int(n) for n in counts],
                           "spread": {key: float(value) for key, value in spread.items()}}
                          for batch, counts, spread in self.queue]}

    def load_state_dict(self, state: dict | None, records_by_id: dict) -> None:
        self.queue = deque(([records_by_id[prompt_id] for prompt_id in entry["prompt_ids"]], entry["counts"],
                            entry["spread"]) for entry in (state or {}).get("queue", []))

    def _pilot_next_chunk(self, step: int, timer) -> None:
        import ray

        statistics = self.config.statistics
        batches = [[self.task.train[index] for index in self.sampler.next_batch()]
                   for _ in range(statistics.chunk_steps)]
        chunk = [record for batch in batches for record in batch]
        pilot = SamplingParams(statistics.pilot_temperature, self.config.generator.top_p,
                               self.config.generator.max_new_tokens)
        shard_refs, scored = self.rollout(chunk, [statistics.n_pilot] * len(chunk), pilot,
                                          step_seed(self.config.seed, step, 2), timer)
        index = np.asarray(scored["request_index"])
        rewards = np.asarray(scored["rewards"], dtype=np.float64)
        acceptance = accepted_per_prompt(rewards, index, len(chunk), acceptance_threshold(self.config)) / statistics.n_pilot
        self.pilot_completions += len(rewards)
        with timer.phase("statistics"):
            sample_norms = ray.get(self.roles.learner.grad_norms.remote(shard_refs, scored["rewards"]))
            grad_norms = per_prompt_mean(sample_norms, index, len(chunk))
            budget = self.config.generator.samples_per_prompt * len(chunk)
            counts, _ = ray.get(self.roles.statistics.allocate_from_pilot.remote(
                [record.prompt_id for record in chunk], acceptance.tolist(), grad_norms.tolist(), budget))
        start = 0
        for batch in batches:
            batch_counts = counts[start:start + len(batch)]
            spread = allocation_spread_metrics(batch_counts, acceptance[start:start + len(batch)])
            self.queue.append((batch, batch_counts, spread))
            start += len(batch)


def make_batch_source(config: JobConfig, task, sampler, roles, rollout):
    if config.statistics.allocation == "gvm" and config.statistics.mode == "offline_pilot":
        return OfflinePilotBatches(config, task, sampler, roles, rollout)
    if config.statistics.allocation == "gvm" and config.statistics.mode == "step_pilot":
        return StepPilotBatches(config, task, sampler, roles)
    return OnlineBatches(config, task, sampler, roles)
