"""GeneratorPool: one named actor per job that spreads generation over its GeneratorActors.

It hands back object references to the engines' results instead of the results themselves, so
samples go from each engine straight to the reward and learner actors, never through the pool or
the driver (DESIGN.md, "Big data moves between actors as Ray object references").

Balancing: the pool remembers, per engine, the work it sent and has not yet seen finish (samples ×
max new tokens of each shard whose result is not ready) and splits each new call with
`rl_service.rollout.balance_requests`, so an engine still busy with an earlier call (async mode,
evaluation next to training) gets less of the next one (for callers that do not wait for earlier shards). The shards are contiguous and come back in
request order: concatenating the results gives the samples in request order. In sync mode every
earlier shard has finished when the next call comes (the driver waits for them), so the split, and
with it every shard's seed, depends only on the call: a run replays bit for bit. Async mode asks for
an even split for the same reason.

Queue depth: after each hand-out the pool records, per engine, the samples it has sent and not seen
finish as the live metric `rl_service_generator_queue_depth` (rl_service/telemetry.py); only a
pool of a run (rl_service/driver/roles.py puts the run's ids in its actors' environment) records.
"""
from __future__ import annotations

import ray

from rl_service.rollout import GenerationRequest, SamplingParams, balance_requests, request_work
from rl_service.telemetry import MetricRecorder, queue_depth_values, run_tags_from_env


@ray.remote
class GeneratorPool:
    def __init__(self, engines: list, engine_resources: dict[str, float] | None = None):
        """`engine_resources`: what one more engine needs from the cluster (a scale-up is checked
        against the free resources before it is accepted)."""
        if not engines:
            raise ValueError("a GeneratorPool needs at least one engine")
        self.engines = list(engines)
        # Per engine: (result ref, work, samples) of every shard sent and not yet seen finished.
        self._pending: list[list[tuple[ray.ObjectRef, int, int]]] = [[] for _ in self.engines]
        self._tags = run_tags_from_env()   # None outside a run (a bare pool): no metrics
        self._telemetry = MetricRecorder()
        self._target: int | None = None   # engines asked for by `rl-service scale`, applied by the driver
        self._engine_resources = dict(engine_resources or {})

    # -- elasticity (rl_service/driver/elastic.py drives it at step boundaries) --------------------------
    def request_engines(self, count: int) -> int:
        """Record a wish for `count` engines; the driver applies it before its next launch."""
        if count < 1:
            raise ValueError(f"--generators {count}: a pool needs at least one engine")
        extra = count - len(self.engines)
        free = ray.available_resources()
        short = {name: amount * extra for name, amount in self._engine_resources.items()
                 if extra > 0 and amount * extra > free.get(name, 0.0) + 1e-9}
        if short:
            raise ValueError(f"--generators {count}: {extra} more engine(s) need {short}, the cluster has "
                             f"{ {name: round(free.get(name, 0.0), 3) for name in short} } free")
        self._target = count
        return count

    def requested_engines(self) -> int | None:
        """The engine count asked for and not yet applied (None: nothing asked)."""
        return self._target if self._target != len(self.engines) else None

    def add_engines(self, engines: list) -> int:
        """Take engines that already serve the current weights; they get requests from the next call."""
        self.engines.extend(engines)
        self._pending.extend([] for _ in engines)
        return len(self.engines)

    def retire_engines(self, count: int) -> list:
        """Stop sending to the last `count` engines; returns [(engine, refs of its unfinished shards)]
        so the caller kills each only after its work is done (nothing in flight is lost)."""
        if count >= len(self.engines):
            raise ValueError(f"cannot retire {count} of {len(self.engines)} engines: one must remain")
        self.outstanding_work()
        retired = [(engine, [ref for ref, _, _ in pending])
                   for engine, pending in zip(self.engines[-count:], self._pending[-count:])]
        del self.engines[-count:], self._pending[-count:]
        if self._tags is not None:
            # A gauge keeps its last value: a retired engine's queue would stay in every `sum by` forever.
            self._telemetry.record(queue_depth_values([0] * count, self._tags, first=len(self.engines)))
        return retired

    def num_engines(self) -> int:
        return len(self.engines)

    def outstanding_work(self) -> list[int]:
        """Samples × max new tokens sent to each engine whose results are not ready yet."""
        refs = [ref for pending in self._pending for ref, _, _ in pending]
        if refs:
            # fetch_local=False: readiness only; the pool never pulls samples into its own process.
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
            done = set(ready)
            self._pending = [[shard for shard in pending if shard[0] not in done] for pending in self._pending]
        return [sum(work for _, work, _ in pending) for pending in self._pending]

    def generate(self, requests: list[GenerationRequest], sampling: SamplingParams, seed: int,
                 even_split: bool = False) -> list[ray.ObjectRef]:
        """Refs to Rollout shards, in request order; shard k is seeded with (seed, k).

        `even_split` ignores the work engines still have outstanding: the split, and so every
        shard's seed, then depends on the call alone (the driver's async mode, which launches while
        earlier shards may still run, asks for it so that a seeded run replays bit for bit)."""
        outstanding = self.outstanding_work()
        if even_split:
            outstanding = [0] * len(outstanding)
        assignment = balance_requests(requests, outstanding, sampling.max_new_tokens)
        refs = []
        for index, (engine_index, shard) in enumerate(assignment):
            ref = self.engines[engine_index].generate.remote(shard, sampling, seed * 1_000_003 + index)
            work = sum(request_work(request, sampling.max_new_tokens) for request in shard)
            self._pending[engine_index].append((ref, work, sum(request.num_samples for request in shard)))
            refs.append(ref)
        if self._tags is not None:
            # Read right after a hand-out, when the queue is deepest: in sync mode every shard has
            # finished by the time anyone could ask later in the step.
            self._telemetry.record(queue_depth_values(
                [sum(samples for _, _, samples in pending) for pending in self._pending], self._tags))
        return refs

    def update_weights(self, weights: list[ray.ObjectRef]) -> list[int]:
        """Load the published weights (one ref, wrapped in a list so Ray does not fetch it here)."""
        (weights_ref,) = weights
        self.outstanding_work()   # drop finished shards' refs, so their samples are not kept alive here
        return ray.get([engine.load_weights.remote(weights_ref) for engine in self.engines])
