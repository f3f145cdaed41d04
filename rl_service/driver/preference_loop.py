"""The driver side of a DPO / BVPO job (ALGORITHMS.md §DPO, §BVPO; DESIGN.md "BVPO step").

Online mode, one step::

    prompts = sampler.next_batch()
    samples = pool.generate(reasoning-on requests + reasoning-off requests)   # ONE call, §BVPO.2
    rewards = reward.score(samples)                                           # verifier or reward model
    pairs   = best vs worst per prompt and mode; ties skipped and counted; per_term: every pair
              trains its own term; same_prompts: only prompts with a pair in both modes (§BVPO.3)
    metrics = learner.train_online(samples, pairs)                            # α L_t + (1 − α) L_e
    pool.update_weights(learner.publish_weights(version + 1))

Offline mode (§BVPO.7) takes each step's rows from the JSONL dataset, no generation; weights go
to the pool only before an evaluation. Evaluation is greedy accuracy with the verifier, reasoning
on and off, in one generate call. `dpo` is trace-only (BVPO with α = 1): no reasoning-off samples.
The driver holds prompt ids, rewards and metrics; samples travel as object references.
"""
from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from rl_service.config import JobConfig
from rl_service.data.preferences import load_preference_file, select_pairs
from rl_service.data.prompts import PromptRecord
from rl_service.data.sampler import PromptSampler
from rl_service.driver.rollout_client import PhaseTimer, RolloutClient, mean_or_nan as _mean
from rl_service.errors import ModelLoadError
from rl_service.models.loading import load_tokenizer, render_prompt
from rl_service.driver.step_loop import LoopResult
from rl_service.driver.roles import Roles
from rl_service.driver.weight_sync import make_weight_sync
from rl_service.rollout import SamplingParams, step_seed
from rl_service.driver.run_dir import RunDirectory
from rl_service.tasks import check_job_inputs, load_task
from rl_service.driver.training_run import PreparedJob, TrainerBase

MODES = ("reasoning_on", "reasoning_off")


def prepare_preference_job(config: JobConfig) -> PreparedJob:
    """Everything that can fail on user input (config, dataset rows, model dirs), before Ray starts."""
    task = load_task(config)
    tokenizer = load_tokenizer(config.model.path, config.model.trust_remote_code)
    preference = config.preference
    if config.algorithm.name == "bvpo" and render_prompt(tokenizer, "1 + 1?", True) == render_prompt(tokenizer, "1 + 1?", False):
        # Without the switch "reasoning off" would silently be reasoning on, and L_e a copy of L_t.
        raise ModelLoadError(f"model.path: the chat template of {config.model.path} has no enable_thinking switch; "
                             "bvpo needs reasoning-off prompts (ALGORITHMS.md §BVPO.2) — use algorithm.name=dpo")
    dataset = None
    if preference.mode == "offline":
        dataset = load_preference_file(preference.dataset_path, preference.on_bad_row,
                                       with_empty=config.algorithm.name == "bvpo")   # dpo: no empty_* pair
        task.train = [PromptRecord(row.pair_id, row.prompt, row.answer or "") for row in dataset.rows]
    check_job_inputs(config, task, tokenizer)   # weights vs config, batch size, prompt lengths (both modes)
    if preference.reward_source == "reward_model":
        from rl_service.rewards.reward_model import check_reward_model_dir

        # A causal LM here would load with a random score head and rank pairs by noise, silently.
        check_reward_model_dir(preference.reward_model_path)
    return PreparedJob(config=config, task=task, tokenizer=tokenizer, dataset=dataset)


class PreferenceTrainer(TrainerBase):
    """A DPO / BVPO job's steps: pairs from both reasoning modes (or the dataset), one learner update."""

    eval_completions_per_prompt = 2   # the eval split with reasoning on and off

    def __init__(self, job: PreparedJob, roles: Roles, run_dir: RunDirectory):
        super().__init__(job, roles, run_dir)
        self.dataset = job.dataset
        self.with_empty = self.config.algorithm.name == "bvpo"
        self.weight_sync = make_weight_sync(roles, self.config)
        self.client = RolloutClient(roles, job.tokenizer, True, job.task.max_prompt_tokens, pipelined=False)
        num_rows = len(self.dataset.rows) if self.dataset is not None else len(self.task.train)
        self.sampler = PromptSampler(num_rows, self.config.data.prompts_per_step, self.config.seed)
        self.learner_version = 0         # optimizer steps taken (ahead of the pool in offline mode)
        self.next_pair_id = 0
        self.totals: dict[str, float] = defaultdict(float)
        self.last_learner_metrics: dict[str, float] = {}

    # -- generation + scoring, both modes in one request batch (§BVPO.2) ----------------------
    def _generate_and_score(self, records, samples: int, sampling: SamplingParams, seed: int, timer: PhaseTimer,
                            with_empty: bool, use_reward_model: bool, split: str = "train", off_samples: int | None = None):
        """One generate call for both modes (§BVPO.2): `samples` per prompt with reasoning on,
        `off_samples` (default `samples`) with it off; then the rewards. Request index: the mode's
        offset × len(records) + the record's position."""
        modes = (True, False) if with_empty else (True,)
        per_mode = {True: samples, False: samples if off_samples is None else off_samples}
        return self.client.rollout([record for _ in modes for record in records],
                                   [per_mode[thinking] for thinking in modes for _ in records], sampling, seed, timer,
                                   split, thinking=[thinking for thinking in modes for _ in records],
                                   with_prompts=use_reward_model)

    def _per_mode(self, name: str, values, request_index, num_prompts: int) -> dict[str, float]:
        values, mode = np.asarray(values, dtype=np.float64), np.asarray(request_index) // max(num_prompts, 1)
        return {f"{name}_{label}": _mean(values[mode == k]) for k, label in enumerate(MODES[:1 + self.with_empty])}

    def evaluate(self, step: int) -> dict[str, float]:
        """Greedy verifier accuracy on the eval split with reasoning on and off (both, even for dpo)."""
        if not self.task.eval:
            return {}
        self.publish(PhaseTimer())
        timer = PhaseTimer()
        greedy = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=self.sampling.max_new_tokens)
        _, scored = self._generate_and_score(self.task.eval, 1, greedy, step_seed(self.config.seed, step, 1), timer,
                                             with_empty=True, use_reward_model=False, split="eval")
        metrics = {f"eval_accuracy_{label}": _mean(np.asarray(scored["rewards"])[np.asarray(scored["request_index"])
                                                                                   // len(self.task.eval) == k])
                   for k, label in enumerate(MODES)}
        metrics["eval_accuracy"] = float(np.mean([metrics[f"eval_accuracy_{label}"] for label in MODES]))
        metrics["eval_seconds"] = sum(timer.seconds.values())
        self.eval_history.append((step, metrics["eval_accuracy"]))
        self.run_dir.log(step, metrics)
        return metrics

    def publish(self, timer: PhaseTimer) -> None:
        """Send the learner's weights to the pool if it serves older ones."""
        if self.weight_version == self.learner_version:
            return
        with timer.phase("publish"):
            versions, _ = self.weight_sync.publish(self.learner_version)
            self.weight_version = min(versions)

    # -- one training step ---------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        started = self.start_step_clock()
        timer = PhaseTimer()
        metrics = self._online_step(step, timer) if self.dataset is None else self._offline_step(timer)
        # A skipped step (no pairs, NaN loss) leaves the weights, and so the version, as they were.
        self.learner_version = int(metrics.get("optimizer_steps", self.learner_version))
        if self.dataset is None:
            self.publish(timer)
        step_seconds = time.perf_counter() - started
        waited = sum(timer.seconds.values())
        metrics.update({"step_seconds": step_seconds, "weight_version": float(self.weight_version),
                        "completions_per_s": metrics.get("completions", 0.0) / step_seconds,
                        "tokens_per_s": metrics.get("completion_tokens", 0.0) / step_seconds,
                        **{f"time_{name}_s": seconds for name, seconds in timer.seconds.items()},
                        "time_driver_s": max(step_seconds - waited, 0.0)})
        for key in ("pairs", "trace_pairs", "empty_pairs", "trace_ties", "empty_ties", "prompts_without_pair"):
            self.totals[key] += metrics.get(key, 0.0)
        self.last_learner_metrics = metrics
        self.add_phase_times(metrics)
        self.telemetry.record_step(metrics)
        self.run_dir.log(step, metrics)
        return metrics

    def _online_step(self, step: int, timer: PhaseTimer) -> dict[str, float]:
        import ray

        records = [self.task.train[index] for index in self.sampler.next_batch()]
        preference = self.config.preference
        shard_refs, scored = self._generate_and_score(
            records, self.config.generator.samples_per_prompt, self.sampling, step_seed(self.config.seed, step, 0), timer,
            self.with_empty, preference.reward_source == "reward_model", off_samples=preference.off_samples_per_prompt)
        resamples = preference.alpha_resamples if preference.alpha_mode == "online" else 0
        selection = select_pairs(scored["rewards"], scored["request_index"], len(records), self.with_empty,
                                 resamples, step_seed(self.config.seed, step, 3), preference.pairing)
        with timer.phase("train"):
            train_metrics = ray.get(self.roles.learner.train_online.remote(shard_refs, selection, self.next_pair_id))
        self.next_pair_id += len(selection.prompts)
        rewards = np.asarray(scored["rewards"], dtype=np.float64)
        lengths = np.asarray(scored["completion_lengths"])
        self.totals["completions"] += len(rewards)
        self.totals["completion_tokens"] += float(lengths.sum())
        return {"reward_mean": _mean(rewards), "completions": float(len(rewards)),
                "completion_tokens": float(lengths.sum()), "truncated_fraction": 1.0 - _mean(scored["finished"]),
                **self._per_mode("reward_mean", rewards, scored["request_index"], len(records)),
                **self._per_mode("completion_length_mean", lengths, scored["request_index"], len(records)),
                **selection.counts, **train_metrics}

    def _offline_step(self, timer: PhaseTimer) -> dict[str, float]:
        import ray

        rows = [self.dataset.rows[index] for index in self.sampler.next_batch()]
        with timer.phase("train"):
            return ray.get(self.roles.learner.train_offline.remote(rows))

    def checkpoint(self, step: int) -> Path:
        import ray

        alpha_state = ray.get(self.roles.learner.alpha_state.remote())
        state = {"step": step, "weight_version": self.learner_version, "sampler": self.sampler.state_dict(),
                 "next_pair_id": self.next_pair_id, "totals": {**self.totals, "train_wall_s": self.train_wall_s()},
                 "eval_history": self.eval_history,
                 "alpha_estimator": alpha_state}   # α̂ is restored from the learner's own state; here to read
        return self.run_dir.write_checkpoint(
            step, lambda directory: ray.get(self.roles.learner.save_checkpoint.remote(str(directory))), {}, state)

    def begin(self, checkpoint: Path | None, state: dict | None) -> None:
        """Continue after a checkpoint (the learner already holds its weights, optimizer, α̂ and
        reference cache): data cursor, pair ids, totals, evals, and a pool serving the checkpoint's
        weights. (Offline, a pool that had not been sent the newest weights yet, no evaluation since
        the last publish, now logs the newer `weight_version`; training is the same.) A fresh offline
        run logs what its dataset holds."""
        if state is None:
            if self.dataset is not None:
                self.run_dir.log(0, {"dataset_rows": float(len(self.dataset.rows)),
                                     "bad_rows_skipped": float(self.dataset.num_skipped)})
            return
        self.restore_common(state)
        self.sampler.load_state_dict(state["sampler"])
        self.next_pair_id = int(state["next_pair_id"])
        self.totals = defaultdict(float, {key: value for key, value in state["totals"].items() if key != "train_wall_s"})
        self.learner_version = int(state["weight_version"])
        self.publish(PhaseTimer())

    def summary(self, result: LoopResult, lost_s: float = 0.0) -> dict:
        """What every job reports (TrainerBase.summary: steps, throughput over the run, time shares, the
        loop's outcome), then pairs, ties and each reasoning mode's eval accuracy."""
        totals, last = self.totals, self.last_learner_metrics
        summary = {
            "algorithm": self.config.algorithm.name,
            "mode": self.config.preference.mode,
            **super().summary(result, lost_s),
            "pairs_trained": int(totals["pairs"]),            # prompts that trained (a pair in one mode or both)
            "trace_pairs_trained": int(totals["trace_pairs"]),
            "empty_pairs_trained": int(totals["empty_pairs"]),
            "trace_ties_skipped": int(totals["trace_ties"]),
            "empty_ties_skipped": int(totals["empty_ties"]),
            "nan_skipped_steps": int(last.get("nan_skipped_steps", 0)),
            "bad_rows_skipped": self.dataset.num_skipped if self.dataset is not None else 0,
        }
        for label in MODES:
            summary[f"initial_eval_accuracy_{label}"] = result.initial.get(f"eval_accuracy_{label}")
            summary[f"final_eval_accuracy_{label}"] = result.final.get(f"eval_accuracy_{label}")
        return summary
