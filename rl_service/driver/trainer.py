"""The driver: the training loop over the Ray roles (DESIGN.md "One training step").

    prompts = sampler.next_batch()
    counts  = statistics.allocate(prompt_ids, budget)
    samples = pool.generate(prompts, counts, version)     # object refs, never fetched here
    rewards = reward.score(samples)
    statistics.update_acceptance(prompt_ids, rewards)
    metrics = learner.train_step(samples, rewards)
    pool.update_weights(learner.publish_weights(version + 1))

Between scoring and training, a step may grow its rollout (`rl_service/driver/step_rounds.py`): the GVM
step pilot spreads the rest of its budget by the pilot's statistics, and DAPO dynamic sampling adds
prompts until enough groups have a reward spread.

That is sync mode (`schedule.mode: sync`). Async mode launches the next steps' rollouts before
training on this one, at most `schedule.max_staleness` weight versions ahead (`rl_service/driver/pipeline.py`
holds the schedule); with a bound of 0 it is the loop above, call for call.

The driver holds prompt ids, rewards and metrics only; samples and weights travel between actors
as object references. Every wait on an actor is timed, so the step breakdown shows where time goes
and what the driver itself costs.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from rl_service.config import JobConfig
from rl_service.data.sampler import PromptSampler
from rl_service.algorithms.acceptance import acceptance_threshold, accepted
from rl_service.driver.batch_source import groups_of, make_batch_source, per_prompt_mean
from rl_service.models.loading import load_tokenizer
from rl_service.driver.evaluation import accuracy_by_group
from rl_service.driver.pipeline import RolloutPipeline
from rl_service.driver.roles import Roles
from rl_service.rollout import SamplingParams, step_seed
from rl_service.driver.rollout_client import (LaunchedRollout, PhaseTimer, RolloutClient, launched_from_state,
                                              launched_state)
from rl_service.driver.run_dir import IN_FLIGHT_ARRAYS, IN_FLIGHT_FILE, RunDirectory
from rl_service.driver.step_metrics import step_metrics
from rl_service.driver.step_rounds import StepRounds
from rl_service.tasks import check_job_inputs, load_task
from rl_service.driver.training_run import PreparedJob, TrainerBase, run_job
from rl_service.driver.weight_sync import make_weight_sync
from rl_service.driver.elastic import Autoscaler, apply_requested_scale



def prepare_job(config: JobConfig) -> PreparedJob:
    """Everything that can fail on user input, done before Ray starts."""
    if config.algorithm.is_preference:  # preference jobs have their own loop (ALGORITHMS.md §BVPO)
        from rl_service.driver.preference_loop import prepare_preference_job

        return prepare_preference_job(config)
    task = load_task(config)
    tokenizer = load_tokenizer(config.model.path, config.model.trust_remote_code)
    check_job_inputs(config, task, tokenizer)   # weights vs config, batch size, prompt lengths
    return PreparedJob(config=config, task=task, tokenizer=tokenizer)


def _seed_for(config: JobConfig, step: int, purpose: int) -> int:
    return step_seed(config.seed, step, purpose)


class Trainer(TrainerBase):
    """A GRPO / RAFT++ job's steps: a batch of rollouts, its rewards and statistics, one learner update."""

    def __init__(self, job: PreparedJob, roles: Roles, run_dir: RunDirectory):
        super().__init__(job, roles, run_dir)
        schedule = self.config.schedule
        self.pipelined = schedule.mode == "async" and schedule.max_staleness > 0
        self.client = RolloutClient(roles, job.tokenizer, job.config.model.thinking, job.task.max_prompt_tokens,
                                    self.pipelined)
        self.sampler = PromptSampler(len(self.task.train), self.config.data.prompts_per_step, self.config.seed)
        self.batches = make_batch_source(self.config, self.task, self.sampler, roles, self.client.rollout)
        self.rounds = StepRounds(self.config, roles, self.client, self.batches, self.sampling)
        self.weight_sync = make_weight_sync(roles, self.config)
        self.accept_threshold = acceptance_threshold(self.config)
        self.autoscaler = Autoscaler(roles, self.config) if self.config.generator.autoscale else None
        self.pipeline = RolloutPipeline(schedule.max_staleness if self.pipelined else 0, self.config.steps)
        self.trained_sampler_state = self.sampler.state_dict()

    def launch(self, step: int, timer: PhaseTimer) -> LaunchedRollout:
        """Step `step`'s prompts, allocation and rollout, sent out and not waited for (timed in the
        step that launches it). A pending `rl-service scale` is applied first, between two hand-outs."""
        with timer.phase("scale"):
            apply_requested_scale(self.roles, self.config, self.weight_version)
        records, counts, allocation_metrics = self.batches.next(step, timer)
        launched = self.client.launch(records, counts, self.sampling, _seed_for(self.config, step, 0), timer)
        launched.sampler_state = self.sampler.state_dict()
        launched.allocation_metrics = allocation_metrics
        return launched

    def evaluate(self, step: int) -> dict[str, float]:
        """Greedy accuracy on the eval split (one completion per prompt, reasoning as configured)."""
        if not self.task.eval:
            return {}
        timer = PhaseTimer()
        greedy = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=self.sampling.max_new_tokens)
        _, scored = self.client.rollout(self.task.eval, [1] * len(self.task.eval), greedy, _seed_for(self.config, step, 1),
                                        timer, split="eval")
        rewards = np.asarray(scored["rewards"])
        metrics = {"eval_accuracy": float(rewards.mean()), "eval_seconds": sum(timer.seconds.values()),
                   "eval_completion_length_mean": float(np.mean(scored["completion_lengths"]))}
        metrics.update(accuracy_by_group(self.task, rewards, scored["request_index"]))
        metrics.update(self._sampled_eval(step))
        self.eval_history.append((step, metrics["eval_accuracy"]))
        self.run_dir.log(step, metrics)
        return metrics

    def _sampled_eval(self, step: int) -> dict[str, float]:
        """pass@k' (k' <= eval.samples) and mean@k at eval.temperature; {} when eval.samples is none.
        The greedy accuracy stays the guard's figure: sampled accuracy is noisier at the same cost."""
        evaluation = self.config.eval
        if evaluation.samples is None:
            return {}
        from rl_service.pass_at_k import sampled_eval_metrics

        timer = PhaseTimer()
        sampling = SamplingParams(temperature=evaluation.temperature, top_p=evaluation.top_p,
                                  max_new_tokens=self.sampling.max_new_tokens)
        # Seed purpose 3: 2 is the offline pilot's (batch_source.py), 10+ the step's extra rounds.
        _, scored = self.client.rollout(self.task.eval, [evaluation.samples] * len(self.task.eval), sampling,
                                        _seed_for(self.config, step, 3), timer, split="eval")
        metrics = sampled_eval_metrics(scored["rewards"], scored["request_index"], len(self.task.eval), evaluation.samples)
        metrics["eval_sampled_seconds"] = sum(timer.seconds.values())
        return metrics

    # -- one training step ---------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        import ray

        started = self.start_step_clock()
        timer = PhaseTimer()
        for ahead in self.pipeline.to_launch(step):   # sync: this step; async: up to max_staleness ahead
            self.pipeline.add(ahead, self.launch(ahead, timer))
        launched = self.pipeline.take(step)
        shard_refs, scored = self.client.collect(launched, timer)                      # generate -> score
        records, shard_refs, scored, mask, round_metrics = self.rounds.extend(step, launched, shard_refs, scored, timer)
        self.trained_sampler_state = self.sampler.state_dict() if mask is not None else launched.sampler_state
        staleness = self.check_staleness(step, scored)
        is_accepted = accepted(np.asarray(scored["rewards"], dtype=np.float64), self.accept_threshold)
        # Dynamic sampling may draw a prompt twice in one step: the statistics see it once.
        prompt_ids = [record.prompt_id for record in records]
        unique_ids, first_record, record_slot = np.unique(prompt_ids, return_index=True, return_inverse=True)
        groups = groups_of(self.config, [records[index] for index in first_record])
        sample_slot = record_slot[np.asarray(scored["request_index"], dtype=np.int64)]
        with timer.phase("statistics"):
            estimates = self.acceptance_estimates(unique_ids, record_slot)   # before this step folds in
            statistics = ray.get(self.roles.statistics.update_acceptance.remote(
                unique_ids.tolist(), np.bincount(sample_slot, weights=is_accepted, minlength=len(unique_ids)).tolist(),
                np.bincount(sample_slot, minlength=len(unique_ids)).tolist(), groups))
        with timer.phase("train"):
            train_metrics, sample_grad_norms = ray.get(self.roles.learner.train_step.remote(
                shard_refs, scored["rewards"], self.batches.wants_grad_norms, mask, estimates))
        if sample_grad_norms is not None:   # §GVM.1 norms, taken on the weights that generated the samples
            with timer.phase("statistics"):
                per_prompt = per_prompt_mean(sample_grad_norms, sample_slot, len(unique_ids))
                train_metrics["nonfinite_grad_norms_dropped"] = float(ray.get(
                    self.roles.statistics.update_grad_norms.remote(unique_ids.tolist(), per_prompt.tolist(), groups)))
        with timer.phase("publish"):
            versions, sync_metrics = self.weight_sync.publish(self.weight_version + 1)
        self.weight_version = min(versions)

        metrics = step_metrics(scored, is_accepted, staleness, timer, time.perf_counter() - started,
                               self.batches.pop_pilot_completions(), self.weight_version, self.pipeline.in_flight,
                               len(self.roles.generators), statistics, round_metrics, train_metrics, sync_metrics)
        samples = np.bincount(np.asarray(scored["request_index"], dtype=np.int64), minlength=len(records))
        self.record(step, metrics, prompt_ids, samples.tolist())
        return metrics

    def acceptance_estimates(self, unique_ids: np.ndarray, record_slot: np.ndarray) -> list[float] | None:
        """p̄ per record for RAFT++'s expected-count normaliser (§GVM.2): the statistics role's moving
        averages of earlier visits (NaN: never seen), so p̄ does not come from the samples it divides;
        None when the learner does not use them."""
        if not self.config.algorithm.divides_by_expected_count:
            return None
        import ray

        estimates = ray.get(self.roles.statistics.acceptance_estimates.remote(unique_ids.tolist()))
        return np.asarray(estimates, dtype=np.float64)[record_slot].tolist()

    def check_staleness(self, step: int, scored: dict) -> np.ndarray:
        """Each sample's lag behind the learner in weight versions; beyond the bound is a bug."""
        staleness = self.weight_version - np.asarray(scored["weight_versions"], dtype=np.int64)
        if staleness.size and int(staleness.max()) > self.pipeline.max_staleness:
            raise RuntimeError(f"step {step} sampled with weights {int(staleness.max())} versions old, "
                               f"beyond the bound of {self.pipeline.max_staleness}")
        return staleness

    def record(self, step: int, metrics: dict, prompt_ids: list, samples: list[int]) -> None:
        """Totals, phase times, the live gauges, metrics.jsonl, the ledger and the autoscaler."""
        self.totals["completions"] += int(metrics["completions"])
        self.totals["completion_tokens"] += int(metrics["completion_tokens"])
        self.add_phase_times(metrics)
        self.telemetry.record_step(metrics)
        self.run_dir.log(step, metrics)
        self.run_dir.log_ledger(step, prompt_ids, samples)
        if self.autoscaler is not None:
            self.autoscaler.observe(metrics)

    def begin(self, checkpoint: Path | None, state: dict | None) -> None:
        """Continue from `checkpoint` if given (the learner already holds its weights and optimizer
        state): data cursor, statistics, counters, and the generators serving the checkpoint's weights."""
        if state is None:
            return
        import ray
        from safetensors.numpy import load_file

        self.restore_common(state)
        self.sampler.load_state_dict(state["sampler"])
        self.trained_sampler_state = state["sampler"]
        self.totals = {key: value for key, value in state["totals"].items() if key != "train_wall_s"}
        self.weight_version = int(state["weight_version"])
        self.pipeline.next_to_launch = int(state["step"]) + 1
        records_by_id = {record.prompt_id: record for record in self.task.train}
        self.batches.load_state_dict(state.get("batch_source"), records_by_id)
        if state.get("in_flight_steps"):   # async: the rollouts launched ahead of the checkpoint, as they were
            in_flight = json.loads((checkpoint / IN_FLIGHT_FILE).read_text(encoding="utf-8"))
            arrays = load_file(str(checkpoint / IN_FLIGHT_ARRAYS))
            for entry in in_flight:
                step = int(entry["step"])
                self.pipeline.add(step, launched_from_state(entry, records_by_id, f"step_{step}", arrays))
                self.sampler.load_state_dict(entry["sampler_state"])   # the cursor after the newest one drew
        statistics = load_file(str(checkpoint / "statistics.safetensors"))
        ray.get(self.roles.statistics.load_state_dict.remote(statistics))
        self.weight_sync.publish(self.weight_version)

    def checkpoint(self, step: int) -> Path:
        import ray
        from safetensors.numpy import save_file

        statistics = ray.get(self.roles.statistics.state_dict.remote())
        # The cursor after the last trained batch: async mode has drawn batches ahead of it.
        totals = {**self.totals, "train_wall_s": self.train_wall_s()}
        # Async mode: rollouts of later steps are in flight, sampled with weights older than the
        # checkpoint's. A resume could not sample them again, so they are waited for and kept.
        arrays: dict = {}
        in_flight = [{"step": ahead, **launched_state(launched, f"step_{ahead}", arrays)}
                     for ahead, launched in self.pipeline.pending()]
        state = {"step": step, "weight_version": self.weight_version, "sampler": self.trained_sampler_state,
                 "totals": totals, "eval_history": self.eval_history, "batch_source": self.batches.state_dict(),
                 "in_flight_steps": [entry["step"] for entry in in_flight]}

        def save(directory: str) -> None:
            ray.get(self.roles.learner.save_checkpoint.remote(directory))
            if in_flight:
                (Path(directory) / IN_FLIGHT_FILE).write_text(json.dumps(in_flight), encoding="utf-8")
                save_file(arrays, str(Path(directory) / IN_FLIGHT_ARRAYS))

        return self.run_dir.write_checkpoint(step, save, statistics, state)


def run_training(job: PreparedJob, run_dir_path: str | Path, resume_from: Path | None = None) -> dict:
    """Run the whole job (either kind); returns the summary (also written to RUN_DIR/summary.json).

    `resume_from`: a checkpoint of this run directory to continue from (`rl-service resume`).
    When a role's process dies (DESIGN.md "Faults"), every role is restarted from the newest
    checkpoint and the steps after it are replayed, up to `cluster.max_role_failures` times: a replay
    from a complete checkpoint is exact (a sync-mode run ends as if nothing had happened), where an
    actor restarted alone would come back without the weights, moments or statistics it held.
    """
    if job.config.algorithm.is_preference:
        from rl_service.driver.preference_loop import PreferenceTrainer as trainer_class
    else:
        trainer_class = Trainer
    return run_job(job, run_dir_path, resume_from, trainer_class)
