"""The driver's side of weight sync (DESIGN.md "Weight sync"): one `publish(version)` per step, two
transports behind it.

- `ObjectStoreWeightSync` (any hardware): the learner `ray.put`s flat buckets once; the pool has
  every generator load them in place from its node's object store.
- `CollectiveWeightSync` (GPU clusters; gloo on CPU for tests): learner rank 0 and every engine
  worker form one process group at start; each publication is a bucketed broadcast from rank 0.

Both return the versions the generators now serve, and what the step's metrics report: bytes
published and seconds taken. Versions are monotone: an engine refuses an older one.
"""
from __future__ import annotations

import time

from rl_service.config import JobConfig


def use_collective(config: JobConfig) -> bool:
    transport = config.weight_sync.transport
    if transport == "auto":
        return config.learner.num_gpus > 0 and config.generator.num_gpus > 0
    return transport == "collective"


class ObjectStoreWeightSync:
    def __init__(self, roles, config: JobConfig):
        self.roles, self.config = roles, config

    def publish(self, version: int) -> tuple[list[int], dict[str, float]]:
        import ray

        started = time.perf_counter()
        published = self.roles.learner.publish_weights.remote(version)
        versions = ray.get(self.roles.pool.update_weights.remote([published]), timeout=self.config.weight_sync.timeout_s)
        num_bytes = ray.get(published).num_bytes
        return versions, {"weight_sync_bytes": float(num_bytes), "weight_sync_seconds": time.perf_counter() - started}


class CollectiveWeightSync:
    """Set up once (every member joins the group); then one broadcast per publication."""

    def __init__(self, roles, config: JobConfig):
        import ray

        self.roles, self.config = roles, config
        timeout = config.weight_sync.timeout_s
        group_sizes = ray.get([engine.weight_group_size.remote() for engine in roles.generators], timeout=timeout)
        world_size = 1 + sum(group_sizes)
        master_addr, master_port = ray.get(roles.learner.ranks[0].rendezvous_address.remote(), timeout=timeout)
        # The layout is the same at every version: fetched once, passed by reference afterwards.
        self.layouts = ray.put(ray.get(roles.learner.weight_layouts.remote(), timeout=timeout))
        device = "cuda" if config.generator.num_gpus > 0 else "cpu"
        joins = [roles.learner.ranks[0].join_weight_group.remote(master_addr, master_port, world_size, timeout)]
        first_rank = 1
        for engine, size in zip(roles.generators, group_sizes):
            joins.append(engine.join_weight_group.remote(master_addr, master_port, first_rank, world_size, device, timeout))
            first_rank += size
        ray.get(joins, timeout=timeout)

    def publish(self, version: int) -> tuple[list[int], dict[str, float]]:
        import ray

        started = time.perf_counter()
        sent = self.roles.learner.broadcast_weights.remote(version)
        received = [engine.receive_weights.remote(self.layouts, version) for engine in self.roles.generators]
        timeout = self.config.weight_sync.timeout_s
        num_bytes = ray.get(sent, timeout=timeout)
        versions = ray.get(received, timeout=timeout)
        return versions, {"weight_sync_bytes": float(num_bytes), "weight_sync_seconds": time.perf_counter() - started}


def make_weight_sync(roles, config: JobConfig):
    return (CollectiveWeightSync if use_collective(config) else ObjectStoreWeightSync)(roles, config)
