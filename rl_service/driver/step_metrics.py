"""What an RL step logs (metrics.jsonl, TensorBoard, the live gauges), from what the driver holds
after the step: the scores of its samples, its phase timer and the roles' own metrics. Pure: no Ray.
"""
from __future__ import annotations

import numpy as np

from rl_service.rewards.verifiers import SCORE_COUNTER_KEYS
from rl_service.driver.rollout_client import PhaseTimer, mean_or_nan

PHASES = ("generate", "reward", "statistics", "train", "publish", "driver")


def step_metrics(scored: dict, is_accepted: np.ndarray, staleness: np.ndarray, timer: PhaseTimer,
                 step_seconds: float, pilot_completions: int, weight_version: int, in_flight: int,
                 engines: int, *role_metrics: dict) -> dict[str, float]:
    """One row: sample facts (reward, acceptance, lengths, counters), throughput over the step's
    wall time, where the time went (each phase the timer saw; `driver` is the rest), then the
    roles' metrics (statistics, extra rounds, learner, weight sync) in that order. `completions`
    counts every generated sample, pilots included (§GVM.6 cost accounting)."""
    rewards = np.asarray(scored["rewards"], dtype=np.float64)
    lengths = np.asarray(scored["completion_lengths"])
    completions, tokens = len(rewards) + pilot_completions, int(lengths.sum())
    waited = sum(timer.seconds.values())
    driver_s = max(step_seconds - waited, 0.0)
    metrics = {
        "reward_mean": mean_or_nan(rewards),
        "accepted_fraction": mean_or_nan(is_accepted),
        "completion_length_mean": mean_or_nan(lengths),
        "truncated_fraction": 1.0 - mean_or_nan(scored["finished"]),
        "completions": float(completions),
        "pilot_completions": float(pilot_completions),
        "completion_tokens": float(tokens),
        "completions_per_s": completions / step_seconds,
        "tokens_per_s": tokens / step_seconds,
        **{key: float(scored[key]) for key in SCORE_COUNTER_KEYS},
        "weight_version": float(weight_version),
        "sample_staleness_mean": mean_or_nan(staleness),
        "rollouts_in_flight": float(in_flight),
        "generator_engines": float(engines),
        "step_seconds": step_seconds,
        "driver_overhead_fraction": driver_s / step_seconds,
        **{f"time_{name}_s": seconds for name, seconds in timer.seconds.items()},
        "time_driver_s": driver_s,
    }
    for extra in role_metrics:
        metrics.update(extra)
    return metrics
