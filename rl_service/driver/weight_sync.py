"""The driver's side of weight sync (DESIGN.md "Weight sync"): one `WeightSync.publish(version)` per
step whatever the transport. The learner publishes through the transport rank 0 was set up with
(actors/weight_publishing.py); the pool has every engine load the result (`GeneratorActor.load_weights`).

- object store (any hardware): the learner `ray.put`s its buckets once; engines read them in place
  from their node's object store.
- shared memory (one node, CPU): the learner copies each version into a /dev/shm mailbox mapped by
  it and every engine for the whole run; engines serve from it or copy from it.
- collective (GPU clusters; gloo on CPU for tests): learner rank 0 and every engine worker form one
  process group at start; each publication is a bucketed broadcast from rank 0, which the engines
  receive while it runs.

`publish` returns the versions the generators now serve, and what the step's metrics report: bytes
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


class WeightSync:
    def __init__(self, roles, config: JobConfig, transport: str = "object_store", broadcast_layouts=None):
        self.roles, self.config, self.transport = roles, config, transport
        self.broadcast_layouts = broadcast_layouts   # collective: a ref to the bucket layouts engines receive into

    def publish(self, version: int) -> tuple[list[int], dict[str, float]]:
        import ray

        from actors.weight_publishing import BroadcastWeights

        started = time.perf_counter()
        published = self.roles.learner.publish_weights.remote(version)
        # A broadcast needs its receivers while the learner sends: engines get their own notice, not
        # the learner's result (which comes only once every bucket has gone out).
        notice = (ray.put(BroadcastWeights(version=version, layouts_ref=self.broadcast_layouts))
                  if self.transport == "collective" else published)
        versions = ray.get(self.roles.pool.update_weights.remote([notice]), timeout=self.config.weight_sync.timeout_s)
        num_bytes = ray.get(published, timeout=self.config.weight_sync.timeout_s).num_bytes
        return versions, {"weight_sync_bytes": float(num_bytes), "weight_sync_seconds": time.perf_counter() - started}


def join_weight_group(roles, config: JobConfig):
    """Collective transport: learner rank 0 and every engine worker join one process group (once,
    at start); returns a ref to the bucket layouts, the same at every version."""
    import ray

    timeout = config.weight_sync.timeout_s
    group_sizes = ray.get([engine.weight_group_size.remote() for engine in roles.generators], timeout=timeout)
    world_size = 1 + sum(group_sizes)
    master_addr, master_port = ray.get(roles.learner.ranks[0].rendezvous_address.remote(), timeout=timeout)
    layouts = ray.put(ray.get(roles.learner.ranks[0].weight_layouts.remote(), timeout=timeout))
    device = "cuda" if config.generator.num_gpus > 0 else "cpu"
    joins = [roles.learner.ranks[0].join_weight_group.remote(master_addr, master_port, world_size, timeout)]
    first_rank = 1
    for engine, size in zip(roles.generators, group_sizes):
        joins.append(engine.join_weight_group.remote(master_addr, master_port, first_rank, world_size, device, timeout))
        first_rank += size
    ray.get(joins, timeout=timeout)
    return layouts


def single_node() -> bool:
    import ray

    return sum(1 for node in ray.nodes() if node["Alive"]) == 1


def make_weight_sync(roles, config: JobConfig) -> WeightSync:
    """Set up the transport `weight_sync.transport` names; `auto`: collective between GPUs, else the
    shared-memory mailbox on a one-node cluster with room in /dev/shm, else the object store."""
    import ray

    if use_collective(config):
        return WeightSync(roles, config, "collective", join_weight_group(roles, config))
    transport = config.weight_sync.transport
    if transport == "shared_memory" or (transport == "auto" and single_node()):
        mailbox = ray.get(roles.learner.ranks[0].open_weight_mailbox.remote(config.job_name),
                          timeout=config.weight_sync.timeout_s)
        if mailbox is not None:
            log.info("weight sync: shared-memory mailbox %s", mailbox[0])
            return WeightSync(roles, config, "shared_memory")
        if transport == "shared_memory":
            raise UserError("weight_sync.transport shared_memory: /dev/shm on the learner's node has no room for "
                            "two copies of the weights; enlarge it (docker --shm-size) or use object_store")
        log.warning("weight sync: /dev/shm has no room for the weight mailbox; using the object store")
    return WeightSync(roles, config)
