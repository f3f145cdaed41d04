"""PreferenceLearnerActor: one DeepSpeed rank applying DPO / BVPO updates (ALGORITHMS.md §DPO, §BVPO)
and publishing weights; a thin wrapper over `rl_service/training/preference_learner.py`."""
from __future__ import annotations

import ray

from actors.process import configure_process
from rl_service.config import JobConfig
from rl_service.data.preferences import PairSelection, PreferenceRow, TokenizedPair, pairs_from_rollout, tokenize_row
from rl_service.rollout import Rollout
from rl_service.weights.flat import PublishedWeights


@ray.remote
class PreferenceLearnerActor:
    def __init__(self, config: JobConfig, resume_from: str | None = None):
        configure_process(config.cluster.torch_threads)
        from rl_service.training.preference_learner import PreferenceLearner

        self.learner = PreferenceLearner(config, resume_from)
        self._tokenized: dict[int, TokenizedPair] = {}

    def ready(self) -> bool:
        return True

    def train_online(self, shard_refs: list[ray.ObjectRef], selection: PairSelection, first_pair_id: int) -> dict:
        """One update on the pairs the driver selected from a step's samples (fetched here, not there)."""
        rollout = Rollout.concat(ray.get(shard_refs))
        return self.learner.train_step(pairs_from_rollout(rollout, selection, first_pair_id))

    def train_offline(self, rows: list[PreferenceRow]) -> dict:
        """One update on dataset rows; each row is tokenized once (its id keys the reference cache)."""
        pairs = []
        for row in rows:
            if row.pair_id not in self._tokenized:
                self._tokenized[row.pair_id] = tokenize_row(self.learner.tokenizer, row, self.learner.with_empty)
            pairs.append(self._tokenized[row.pair_id])
        return self.learner.train_step(pairs)

    def publish_weights(self, version: int, via_object_store: bool = False) -> PublishedWeights:
        """One rank, one transport: the object store (actors/weight_publishing.py), whatever is asked."""
        from actors.weight_publishing import ObjectStorePublisher

        publisher = ObjectStorePublisher()
        return publisher.publish(self.learner.weight_buckets(version, packed=publisher.packed), version)

    def save_pretrained(self, directory: str) -> None:
        self.learner.save_pretrained(directory)

    def save_checkpoint(self, directory: str) -> None:
        """Everything a resumed learner needs (weights, optimizer, counters, α̂, reference cache)."""
        self.learner.save_checkpoint(directory)

    def alpha_state(self) -> dict[str, float]:
        return self.learner.alpha_state()
