"""LearnerActor: one DeepSpeed rank applying GRPO / RAFT++ updates and publishing weights."""
from __future__ import annotations

import ray

from actors.process import configure_process, role_threads
from rl_service.config import JobConfig
from rl_service.rollout import Rollout
from rl_service.weights.flat import FlatWeights


@ray.remote
class LearnerActor:
    def __init__(self, config: JobConfig, resume_from: str | None = None):
        configure_process(role_threads(config, "learner"))
        from rl_service.training.policy_learner import PolicyLearner

        self.learner = PolicyLearner(config, resume_from)

    def ready(self) -> bool:
        return True

    def train_step(self, shard_refs: list[ray.ObjectRef], rewards: list[float],
                   with_grad_norms: bool = False) -> tuple[dict[str, float], list[float] | None]:
        """One update on a step's rollouts; with GVM also the accepted samples' gradient norms (§GVM.1),
        taken before the update, on the weights that generated them."""
        rollout = Rollout.concat(ray.get(shard_refs))
        grad_norms = self.learner.accepted_grad_norms(rollout, rewards) if with_grad_norms else None
        return self.learner.train_step(rollout, rewards), grad_norms

    def grad_norms(self, shard_refs: list[ray.ObjectRef], rewards: list[float]) -> list[float]:
        """Gradient norms alone: the offline pilot (§GVM.5) measures without training."""
        return self.learner.accepted_grad_norms(Rollout.concat(ray.get(shard_refs)), rewards)

    def publish_weights(self, version: int) -> FlatWeights:
        return self.learner.flat_weights(version)

    def save_pretrained(self, directory: str) -> None:
        self.learner.save_pretrained(directory)

    def save_checkpoint(self, directory: str) -> None:
        """The learner's part of a checkpoint: `model/` plus optimizer, schedule, RNG and counters."""
        self.learner.save_checkpoint(directory)
