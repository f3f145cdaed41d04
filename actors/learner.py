"""LearnerActor: one DeepSpeed rank applying GRPO / RAFT++ updates (`PolicyLearner`), or DPO / BVPO
updates (`PreferenceLearner`, one rank) for a preference job, and publishing weights.

A rank is created, then joins: `join` sets up the process group (rank 0 hands out the address,
`actors/learner_group.py` passes it on), and `build` makes the engine, a collective DeepSpeed step.
Every call that runs collectives (train_step, grad_norms, publish_weights under ZeRO-3,
save_checkpoint) goes to all ranks at once; rank 0 returns what the driver reads.
"""
from __future__ import annotations

import functools
import os

import ray

from actors.process import configure_process, role_threads
from rl_service.config import JobConfig
from rl_service.rollout import Rollout


def collective(method):
    """A call the ranks make together. If it raises on rank r > 0, the rank logs the error and its
    process exits: its sockets close, so rank 0's pending collective fails at once (gloo does not
    notice a peer that only destroys its process group, and would wait out the collective timeout)."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception:
            if self.rank > 0:
                import traceback

                traceback.print_exc()
                print(f"learner rank {self.rank} failed in {method.__name__}; leaving the group", flush=True)
                os._exit(1)
            raise
    return call


@ray.remote(concurrency_groups={"probe": 1})
class LearnerActor:
    def __init__(self, config: JobConfig, resume_from: str | None = None, rank: int = 0):
        self.config, self.resume_from, self.rank = config, resume_from, rank
        self.learner = None
        self.publisher = None   # rank 0's weight transport (actors/weight_publishing.py); object store if None

    @ray.method(concurrency_group="probe")
    def location(self) -> dict:
        """Where this rank runs: its node (id and Ray address) and process id. In its own concurrency
        group, so it answers while `join` waits in the rendezvous: a rank that does not answer is hung."""
        node_id = ray.get_runtime_context().get_node_id()
        address = next((node["NodeManagerAddress"] for node in ray.nodes() if node["NodeID"] == node_id),
                       ray.util.get_node_ip_address())
        return {"node_id": node_id, "node_ip": address, "pid": os.getpid()}

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0: its node's Ray address (127.0.0.1 on a local cluster) and a free port there."""
        from rl_service.training.engine import free_port

        host = self.location()["node_ip"]
        return host, free_port(host)

    def join(self, master_addr: str, master_port: int, world_size: int, ranks_on_node: int) -> bool:
        """Join the process group: returns once every rank has (the rendezvous waits for all)."""
        # The node's learner threads are shared by the ranks placed on it.
        configure_process(max(1, role_threads(self.config, "learner") // ranks_on_node))
        from rl_service.training.engine import init_process_group

        init_process_group(self.rank, world_size, master_addr, master_port)
        return True

    @collective
    def build(self) -> bool:
        """Build this rank's engine (every rank together: DeepSpeed broadcasts and partitions). Not
        under the join time limit: loading a large model may take long, and a peer that dies here
        fails the others at once."""
        if self.config.algorithm.is_preference:
            from rl_service.training.preference_learner import PreferenceLearner as Learner
        else:
            from rl_service.training.policy_learner import PolicyLearner as Learner
        self.learner = Learner(self.config, self.resume_from)
        return True

    def ready(self) -> bool:
        return self.learner is not None

    @collective
    def train_step(self, shard_refs: list[ray.ObjectRef], rewards: list[float], with_grad_norms: bool = False,
                   train_mask: list[bool] | None = None,
                   acceptance_estimates: list[float] | None = None) -> tuple[dict[str, float], list[float] | None]:
        """One update on a step's rollouts; with GVM also the accepted samples' gradient norms (§GVM.1),
        taken before the update, on the weights that generated them. `train_mask`: which samples
        train (dynamic sampling, §DAPO); all of them when None. `acceptance_estimates`: p̄ per
        prompt of the step (RAFT++ `accepted_normaliser: expected`)."""
        rollout = Rollout.concat(ray.get(shard_refs))
        grad_norms = self.learner.accepted_grad_norms(rollout, rewards) if with_grad_norms else None
        return self.learner.train_step(rollout, rewards, train_mask, acceptance_estimates), grad_norms

    @collective
    def grad_norms(self, shard_refs: list[ray.ObjectRef], rewards: list[float]) -> list[float]:
        """Gradient norms alone: the offline pilot (§GVM.5) measures without training."""
        return self.learner.accepted_grad_norms(Rollout.concat(ray.get(shard_refs)), rewards)

    def train_online(self, shard_refs: list[ray.ObjectRef], selection, first_pair_id: int) -> dict[str, float]:
        """Preference job, online: one DPO / BVPO update on the pairs the driver selected (§BVPO.3)."""
        return self.learner.train_online(Rollout.concat(ray.get(shard_refs)), selection, first_pair_id)

    def train_offline(self, rows: list) -> dict[str, float]:
        """Preference job, offline: one update on dataset rows (§BVPO.7)."""
        return self.learner.train_offline(rows)

    def alpha_state(self) -> dict[str, float]:
        """Preference job: the α̂ moving averages (§BVPO.6), for the driver's checkpoint."""
        return self.learner.alpha_state()

    @collective
    def completion_logprobs(self, shard_refs: list[ray.ObjectRef]) -> list[list[float]]:
        return self.learner.completion_logprobs(Rollout.concat(ray.get(shard_refs)))

    @collective
    def publish_weights(self, version: int, via_object_store: bool = False):
        """Version `version` through the job's transport (the publisher rank 0 was set up with; the
        object store until then), or through the object store (`via_object_store`: engines that
        join a running pool). Rank 0 returns what the engines load; the other ranks only help
        ZeRO-3 gather each bucket."""
        from actors.weight_publishing import ObjectStorePublisher, drain

        publisher = ObjectStorePublisher() if via_object_store or self.publisher is None else self.publisher
        buckets = self.learner.weight_buckets(version, packed=publisher.packed)
        if self.rank > 0:
            return drain(buckets)
        return publisher.publish(buckets, version)

    def open_weight_mailbox(self, tag: str) -> tuple[str, str, object] | None:
        """Rank 0: publish through a /dev/shm mailbox from now on (shared-memory transport); returns
        (path, node id, layout), or None when /dev/shm has no room for two copies of the weights.
        Asked again, it returns the mailbox it has."""
        from actors.weight_publishing import MailboxPublisher
        from rl_service.weights.shared_memory import WeightMailbox, room_for

        if not isinstance(self.publisher, MailboxPublisher):
            layout = self.learner.mailbox_layout()
            if not room_for(layout):
                return None
            self.publisher = MailboxPublisher(WeightMailbox.create(layout, tag))
        return self.publisher.where()

    def close_weight_mailbox(self) -> None:
        """Remove the mailbox file, if this rank has one (a killed process cannot: it holds two
        copies of the weights in tmpfs)."""
        close = getattr(self.publisher, "close", None)
        if close is not None:
            close()
            self.publisher = None

    def weight_layouts(self) -> list | None:
        """The bucket layout of the weights (the same at every version), from the parameters' shapes:
        what the engines of the collective transport allocate and receive into (rank 0 answers)."""
        return self.learner.bucket_layouts() if self.rank == 0 else None

    def join_weight_group(self, master_addr: str, master_port: int, world_size: int, timeout_s: float) -> bool:
        """Rank 0: be rank 0 of the learner-engines weight group and publish by broadcast from now on
        (collective transport)."""
        import torch

        from actors.weight_publishing import BroadcastPublisher
        from rl_service.weights.collective import WeightBroadcastGroup

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.publisher = BroadcastPublisher(WeightBroadcastGroup(master_addr, master_port, 0, world_size, device, timeout_s))
        return True

    @collective
    def save_pretrained(self, directory: str) -> None:
        self.learner.save_pretrained(directory)

    @collective
    def save_checkpoint(self, directory: str) -> None:
        """The learner's part of a checkpoint: `model/` plus optimizer, schedule, RNG and counters
        (each rank its own optimizer partition)."""
        self.learner.save_checkpoint(directory)
