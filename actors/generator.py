"""GeneratorActor: one inference engine serving one weight version at a time."""
from __future__ import annotations

import ray

from actors.process import configure_process, role_threads
from actors.weight_publishing import BroadcastWeights
from rl_service.config import JobConfig
from rl_service.generation.engines import make_engine
from rl_service.rollout import GenerationRequest, Rollout, SamplingParams
from rl_service.weights.flat import FlatWeights, PublishedWeights
from rl_service.weights.shared_memory import MAX_READERS, MailboxWeights, WeightMailbox


@ray.remote
class GeneratorActor:
    def __init__(self, config: JobConfig, engine_index: int):
        configure_process(role_threads(config, "generator"))
        self.engine_index = engine_index
        self.engine = make_engine(config)
        self.mailbox: WeightMailbox | None = None   # this node's weight mailbox, once a version came through it

    def generate(self, requests: list[GenerationRequest], sampling: SamplingParams, seed: int) -> Rollout:
        return self.engine.generate(requests, sampling, seed)

    def load_weights(self, weights: PublishedWeights | FlatWeights | MailboxWeights | BroadcastWeights) -> int:
        """Load one version, whichever transport brought it (actors/weight_publishing.py): published
        buckets (read zero-copy from this node's object store), one flat buffer, a slot of this
        node's weight mailbox, or a broadcast from learner rank 0 to receive now. Calls to an actor
        run one at a time, so no generate call sees half a version."""
        if isinstance(weights, MailboxWeights):
            return self._load_from_mailbox(weights)
        if isinstance(weights, BroadcastWeights):
            received = self.engine.receive_weights(ray.get(weights.layouts_ref), weights.version)
            self._hold_slot(None)
            return received
        if isinstance(weights, PublishedWeights):
            weights = ray.get(weights.bucket_refs)
        version = self.engine.load_weights(weights)
        self._hold_slot(None)
        return version

    def _load_from_mailbox(self, weights: MailboxWeights) -> int:
        """Shared-memory transport: serve the slot's views where the engine can (no copy), else copy
        from them; then record in the mailbox which slot this engine still reads, so the learner
        never overwrites it."""
        node_id = self.node_id()
        if weights.node_id != node_id:
            raise ValueError(f"generator {self.engine_index} runs on node {node_id}, the learner's weight mailbox "
                             f"is on node {weights.node_id}: set weight_sync.transport to object_store "
                             "(or place the generators on the learner's node)")
        if self.mailbox is None or str(self.mailbox.path) != weights.path:
            self.mailbox = WeightMailbox.open(weights.path, weights.layout)
        share = self.engine_index < MAX_READERS   # beyond the reader table an engine copies
        shared = self.engine.load_shared_weights(self.mailbox.tensors(weights.slot, weights.version),
                                                 weights.version, share)
        self._hold_slot(weights.slot if shared else None)
        return self.engine.weight_version

    def _hold_slot(self, slot: int | None) -> None:
        if self.mailbox is not None and self.engine_index < MAX_READERS:
            self.mailbox.hold(self.engine_index, slot)

    def node_id(self) -> str:
        """The Ray node this engine runs on (placement checks, the dashboard's view)."""
        return ray.get_runtime_context().get_node_id()

    def weight_group_size(self) -> int:
        """Members this engine adds to the collective weight group (one per worker)."""
        return self.engine.weight_group_size

    def join_weight_group(self, master_addr: str, master_port: int, first_rank: int, world_size: int,
                          device: str, timeout_s: float) -> bool:
        self.engine.join_weight_group(master_addr, master_port, first_rank, world_size, device, timeout_s)
        return True

    def weight_version(self) -> int:
        return self.engine.weight_version

    def shutdown(self) -> None:
        """Stop the engine before Ray tears the process down (vLLM: no abort at exit)."""
        self._hold_slot(None)
        stop = getattr(self.engine, "shutdown", None)
        if stop is not None:
            stop()
