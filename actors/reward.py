"""RewardActor: scores rollouts with the configured verifier, batched."""
from __future__ import annotations

import time

import ray

from actors.process import configure_process
from rl_service.rewards.verifiers import score_batch
from rl_service.rollout import Rollout


@ray.remote
class RewardActor:
    def __init__(self, verifier: str, timeout_s: float, torch_threads: int | None = None):
        configure_process(1)
        self.verifier = verifier
        self.timeout_s = timeout_s

    def score(self, shard_refs: list[ray.ObjectRef], answers: list[str]) -> dict:
        """Rewards in sample order plus the small per-sample facts the driver logs.

        `answers[i]` is the gold answer of request i; shards are fetched here, not in the driver.
        """
        rollout = Rollout.concat(ray.get(shard_refs))
        started = time.perf_counter()
        gold = [answers[index] for index in rollout.request_index]
        rewards = score_batch(rollout.completion_texts, gold, self.verifier, self.timeout_s)
        return {
            "rewards": rewards,
            "request_index": rollout.request_index,
            "completion_lengths": [len(tokens) for tokens in rollout.completion_token_ids],
            "finished": rollout.finished,
            "weight_versions": rollout.weight_versions,
            "verify_seconds": time.perf_counter() - started,
        }
