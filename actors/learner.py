"""LearnerActor: one DeepSpeed rank applying GRPO / RAFT++ updates and publishing weights."""
from __future__ import annotations

import ray

from actors.process import configure_process
from rl_service.config import JobConfig
from rl_service.rollout import Rollout
from rl_service.weights.flat import FlatWeights


@ray.remote
class LearnerActor:
    def __init__(self, config: JobConfig):
        configure_process(config.cluster.torch_threads)
        from rl_service.training.policy_learner import PolicyLearner

        self.learner = PolicyLearner(config)

    def ready(self) -> bool:
        return True

    def train_step(self, shard_refs: list[ray.ObjectRef], rewards: list[float]) -> dict[str, float]:
        rollout = Rollout.concat(ray.get(shard_refs))
        return self.learner.train_step(rollout, rewards)

    def publish_weights(self, version: int) -> FlatWeights:
        return self.learner.flat_weights(version)

    def save_pretrained(self, directory: str) -> None:
        self.learner.save_pretrained(directory)
