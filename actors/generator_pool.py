"""GeneratorPool: one named actor per job that spreads generation over its GeneratorActors.

It hands back object references to the engines' results instead of the results themselves, so
samples go from each engine straight to the reward and learner actors, never through the pool or
the driver (DESIGN.md, "Big data moves between actors as Ray object references").
"""
from __future__ import annotations

import ray

from rl_service.rollout import GenerationRequest, SamplingParams, split_requests


@ray.remote
class GeneratorPool:
    def __init__(self, engines: list):
        if not engines:
            raise ValueError("a GeneratorPool needs at least one engine")
        self.engines = list(engines)

    def num_engines(self) -> int:
        return len(self.engines)

    def generate(self, requests: list[GenerationRequest], sampling: SamplingParams, seed: int) -> list[ray.ObjectRef]:
        """Refs to Rollout shards, in request order; shard k is seeded with (seed, k)."""
        shards = split_requests(requests, len(self.engines))
        return [engine.generate.remote(shard, sampling, seed * 1_000_003 + index)
                for index, (engine, shard) in enumerate(zip(self.engines, shards))]

    def update_weights(self, weights: list[ray.ObjectRef]) -> list[int]:
        """Load the published weights (one ref, wrapped in a list so Ray does not fetch it here)."""
        (weights_ref,) = weights
        return ray.get([engine.load_weights.remote(weights_ref) for engine in self.engines])

    def weight_versions(self) -> list[int]:
        return ray.get([engine.weight_version.remote() for engine in self.engines])
