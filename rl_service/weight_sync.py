"""The driver's side of weight sync (DESIGN.md "Weight sync"): one `publish(version)` per step, three
transports behind it.

- `ObjectStoreWeightSync` (any hardware): the learner `ray.put`s flat buckets once; the pool has
  every generator load them in place from its node's object store.
- `CollectiveWeightSync` (GPU clusters; gloo on CPU for tests): learner rank 0 and every engine
  worker form one process group at start; each publication is a bucketed broadcast from rank 0.

- `SharedMemoryWeightSync` (one node, CPU): the learner copies each version into a mailbox in
  /dev/shm mapped by it and every engine for the whole run; engines serve from it or copy from it.

All return the versions the generators now serve, and what the step's metrics report: bytes
published and seconds taken. Versions are monotone: an engine refuses an older one.
"""
from __future__ import annotations

import logging
import time

from rl_service.config import JobConfig
from rl_service.errors import UserError

log = logging.getLogger(__name__)


def use_collective(config: JobConfig) -> bool:
    transport = config.weight_sync.transport
    if transport == "auto":
        return config.learner.num_gpus > 0 and config.generator.num_gpus > 0
    return transport == "collective"


class ObjectStoreWeightSync:
    learner_method = "publish_weights"   # what the learner ranks run; rank 0 returns what engines load

    def __init__(self, roles, config: JobConfig):
        self.roles, self.config = roles, config

    def publish(self, version: int) -> tuple[list[int], dict[str, float]]:
        import ray

        started = time.perf_counter()
        published = getattr(self.roles.learner, self.learner_method).remote(version)
        versions = ray.get(self.roles.pool.update_weights.remote([published]), timeout=self.config.weight_sync.timeout_s)
        num_bytes = ray.get(published).num_bytes
        return versions, {"weight_sync_bytes": float(num_bytes), "weight_sync_seconds": time.perf_counter() - started}


class SharedMemoryWeightSync(ObjectStoreWeightSync):
    """One node: learner rank 0 copies each version into a mailbox in /dev/shm that it and the
    engines keep mapped (rl_service/weights/shared_memory.py); the HF engine serves its parameters
    from it directly, vLLM reloads from it. The same publish as the object store's, minus Ray's
    per-version object and its fresh pages."""
    learner_method = "write_weight_mailbox"

    def __init__(self, roles, config: JobConfig, mailbox: tuple):
        super().__init__(roles, config)
        self.path, self.node_id, _ = mailbox


def open_mailbox(roles, config: JobConfig) -> tuple | None:
    """Have learner rank 0 create the job's mailbox: (path, node id, layout), or None (no room)."""
    import ray

    return ray.get(roles.learner.ranks[0].open_weight_mailbox.remote(config.job_name),
                   timeout=config.weight_sync.timeout_s)


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
        self.layouts = ray.put(ray.get(roles.learner.ranks[0].weight_layouts.remote(), timeout=timeout))
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


def single_node() -> bool:
    import ray

    return sum(1 for node in ray.nodes() if node["Alive"]) == 1


def make_weight_sync(roles, config: JobConfig):
    """The transport `weight_sync.transport` names; `auto`: collective between GPUs, else the
    shared-memory mailbox on a one-node cluster with room in /dev/shm, else the object store."""
    if use_collective(config):
        return CollectiveWeightSync(roles, config)
    transport = config.weight_sync.transport
    if transport == "shared_memory" or (transport == "auto" and single_node()):
        mailbox = open_mailbox(roles, config)
        if mailbox is not None:
            log.info("weight sync: shared-memory mailbox %s", mailbox[0])
            return SharedMemoryWeightSync(roles, config, mailbox)
        if transport == "shared_memory":
            raise UserError("weight_sync.transport shared_memory: /dev/shm on the learner's node has no room for "
                            "two copies of the weights; enlarge it (docker --shm-size) or use object_store")
        log.warning("weight sync: /dev/shm has no room for the weight mailbox; using the object store")
    return ObjectStoreWeightSync(roles, config)
