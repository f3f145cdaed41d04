"""LearnerGroup: the driver's one handle on `learner.num_ranks` LearnerActors (verl's "worker group").

Ranks live in one placement group (`learner.placement`, PACK by default) so the learner is placed and
sized apart from the generator pool. `group.train_step.remote(...)` calls every rank at once (their
collectives need all of them) and returns rank 0's result ref; the other ranks' refs are checked at
the next call, so a rank that failed alone is still reported.

Joining: every rank is started, rank 0 hands out an address, and all ranks join the process group
within `learner.join_timeout_s`; then they build their engines together (no time limit: a large
model loads slowly). A rank that has not joined by then (its node unreachable, its process hung)
is named with its node, and every rank is released: no hang.
"""
from __future__ import annotations

import ray

from rl_service.config import JobConfig
from rl_service.errors import UserError

# Calls that run on every rank (collectives inside); rank 0's result is the group's.
ALL_RANK_METHODS = ("ready", "train_step", "grad_norms", "completion_logprobs", "publish_weights",
                   "save_pretrained", "save_checkpoint", "train_online", "train_offline", "alpha_state")


class RankJoinTimeout(UserError):
    """A learner rank did not join its process group in time (reported in one line, exit code 2)."""


class _AllRanks:
    def __init__(self, group: "LearnerGroup", method: str):
        self.group, self.method = group, method

    def remote(self, *args, **kwargs) -> ray.ObjectRef:
        self.group.raise_earlier_failures()
        refs = [getattr(rank, self.method).remote(*args, **kwargs) for rank in self.group.ranks]
        self.group.pending.extend(refs[1:])
        return refs[0]


class LearnerGroup:
    def __init__(self, ranks: list, placement=None):
        self.ranks = ranks
        self.placement = placement
        self.pending: list[ray.ObjectRef] = []
        self.locations: list[dict] = []   # per rank: node id, node address, pid (once started)

    def __getattr__(self, name: str) -> _AllRanks:
        if name in ALL_RANK_METHODS:
            return _AllRanks(self, name)
        raise AttributeError(name)

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def raise_earlier_failures(self) -> None:
        """Raise the error of any finished call of ranks 1.. (rank 0's own errors reach its caller)."""
        if not self.pending:
            return
        done, self.pending = ray.wait(self.pending, num_returns=len(self.pending), timeout=0, fetch_local=False)
        ray.get(done)

    def release(self) -> None:
        """Kill every rank and free the placement group (rank 0 first removes its weight mailbox,
        if it has one: a killed process cannot, and the file holds two copies of the weights)."""
        closing = self.ranks[0].close_weight_mailbox.remote()
        ray.wait([closing], timeout=2)   # a hung rank 0 must not hold the release up
        for rank in self.ranks:
            ray.kill(rank, no_restart=True)
        if self.placement is not None:
            ray.util.remove_placement_group(self.placement)


def learner_bundles(config: JobConfig) -> list[dict]:
    learner = config.learner
    bundle = {"CPU": float(learner.num_cpus), **{name: float(amount) for name, amount in learner.resources.items()}}
    if learner.num_gpus > 0:
        bundle["GPU"] = float(learner.num_gpus)
    return [dict(bundle) for _ in range(learner.num_ranks)]


def start_learner_group(config: JobConfig, resume_from: str | None = None, *, join: bool = True) -> LearnerGroup:
    """Place and start the ranks; with `join`, also wait for them to join (`join_learner_group`)."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from actors.learner import LearnerActor
    from actors.process import LEARNER_ENV
    from rl_service.run_ids import submission_id

    learner = config.learner
    placement = None
    if learner.num_ranks > 1:
        placement = placement_group(learner_bundles(config), strategy=learner.placement,
                                    name=f"{submission_id(config.job_name)}/learner")
        ready, _ = ray.wait([placement.ready()], timeout=learner.join_timeout_s)
        if not ready:
            ray.util.remove_placement_group(placement)
            raise RankJoinTimeout(
                f"learner: {learner.num_ranks} ranks of {learner_bundles(config)[0]} could not be placed "
                f"({learner.placement}) within learner.join_timeout_s={learner.join_timeout_s:g} s; the cluster "
                f"has {ray.available_resources()} free")
    ranks = []
    for rank in range(learner.num_ranks):
        options = {"name": f"{submission_id(config.job_name)}/learner/{rank}", "num_cpus": learner.num_cpus,
                   "num_gpus": learner.num_gpus, "resources": dict(learner.resources),
                   "runtime_env": {"env_vars": dict(LEARNER_ENV)}}
        if placement is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=placement, placement_group_bundle_index=rank)
            options["resources"] = {}   # the bundle holds them
        ranks.append(LearnerActor.options(**options).remote(config, resume_from, rank))
    group = LearnerGroup(ranks, placement)
    group.locations = _locations(group, learner.join_timeout_s)
    if join:
        join_learner_group(group, config)
    return group


def join_learner_group(group: LearnerGroup, config: JobConfig) -> None:
    """Every rank joins the process group and builds its engine, or the group is released with an
    error naming the first rank that did not (and its node)."""
    timeout = config.learner.join_timeout_s
    locations = group.locations
    nodes = [location["node_id"] for location in locations]
    master_addr, master_port = ray.get(group.ranks[0].rendezvous_address.remote(), timeout=timeout)
    joins = [rank.join.remote(master_addr, master_port, group.world_size, nodes.count(nodes[index]))
             for index, rank in enumerate(group.ranks)]
    ready, _ = ray.wait(joins, num_returns=len(joins), timeout=timeout)
    if len(ready) < len(joins):
        waiting = [index for index, ref in enumerate(joins) if ref not in ready]
        # Ranks still in the rendezvous answer a probe (own concurrency group); a hung one does not.
        probes = {index: group.ranks[index].location.remote() for index in waiting}
        answered, _ = ray.wait(list(probes.values()), num_returns=len(probes), timeout=10)
        silent = [index for index, ref in probes.items() if ref not in answered]
        group.release()
        culprit = silent[0] if silent else waiting[-1]
        where = locations[culprit]
        why = "does not respond" if silent else f"is alive but never reached {master_addr}:{master_port}"
        raise RankJoinTimeout(
            f"learner rank {culprit} on node {where['node_ip']} ({where['node_id'][:12]}, pid {where['pid']}) did not "
            f"join the process group within learner.join_timeout_s={timeout:g} s: it {why}; ranks {waiting} had not "
            f"joined; all {group.world_size} ranks were released")
    try:
        ray.get(joins)
        ray.get([rank.build.remote() for rank in group.ranks])
    except Exception:
        group.release()
        raise


def _locations(group: LearnerGroup, timeout: float) -> list[dict]:
    refs = [rank.location.remote() for rank in group.ranks]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    missing = [index for index, ref in enumerate(refs) if ref not in ready]
    if missing:
        group.release()
        raise RankJoinTimeout(f"learner rank {missing[0]} did not start within learner.join_timeout_s={timeout:g} s "
                              f"(no node reported); all {group.world_size} ranks were released")
    return ray.get(refs)
