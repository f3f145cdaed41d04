"""The driver's side of Ray: start or join a cluster and place one actor per role.

Actors are named `<submission id>/<role>/<index>` (the id starts with the job name, so two runs of
one config differ) and the dashboard's actor list reads like the design; each gets its
CPU/GPU/custom resources from its own config section, so rollout and learner land
on the nodes a user names and scale independently.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator
from dataclasses import dataclass

from rl_service.config import JobConfig
from rl_service.config.cluster import is_job_server_url
from rl_service.run_ids import JOB_NAME_ENV, SUBMISSION_ID_ENV, new_submission_id, submission_id  # noqa: F401 (re-exported)


@dataclass
class Roles:
    pool: object
    generators: list
    rewards: list
    statistics: object
    learner: object


# Reward actors hold no state a step depends on (scoring is a pure function of the samples), so Ray
# itself restarts a dead one and retries its call: no replay. Generators, statistics and the learner
# hold weights, moving averages or optimizer state; their deaths go to the driver's restart from
# the newest checkpoint (`is_role_failure`), which brings all of it back exactly.
STATELESS_RESTARTS = {"max_restarts": 3, "max_task_retries": 3}


def is_role_failure(error: BaseException) -> bool:
    """Whether `error` means a role's process died (a kill, a crash, out of memory) rather than a bug
    in its code: Ray reports the death where the actor is called, or as the cause of the task of
    another actor that was waiting on it (a reward actor fetching a dead generator's samples)."""
    from ray import exceptions

    died = (exceptions.RayActorError, exceptions.ObjectLostError, exceptions.OwnerDiedError,
            exceptions.WorkerCrashedError, exceptions.LocalRayletDiedError)
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, exceptions.RayActorError) and error.actor_init_failed:
            return False   # its __init__ raised: a restart would raise again
        if isinstance(error, died):
            return True
        error = getattr(error, "cause", None) if isinstance(error, exceptions.RayTaskError) else error.__cause__
        seen += 1
    return False


def run_with_restarts(config: JobConfig, run_dir_path, resume_from, attempt: Callable, on_failure: Callable = lambda: None):
    """`attempt(resume_from, restart, failures)` until it returns; when a role's process died in it
    (DESIGN.md "Faults"), again from the run's newest checkpoint, up to `cluster.max_role_failures`
    times. `on_failure()` runs after each failed attempt (the RL trainer counts its lost time)."""
    import logging

    from rl_service.driver.run_dir import latest_checkpoint

    failures, restart, limit = 0, False, config.cluster.max_role_failures
    while True:
        try:
            return attempt(resume_from, restart, failures)
        except Exception as error:  # noqa: BLE001 - only role deaths are recovered; the rest re-raises
            from rl_service.driver.stop_signal import stop_requested

            if stop_requested() is not None:   # not a dead role: the stop, come out of Ray as another error
                raise stop_requested() from None
            if not is_role_failure(error):
                raise
            on_failure()
            failures += 1
            if failures > limit:
                raise RuntimeError(f"giving up after {failures} role failures "
                                   f"(cluster.max_role_failures={limit}): {error}") from error
            resume_from, restart = latest_checkpoint(run_dir_path), True
            logging.getLogger("rl_service").warning(
                "a role died (%s: %s); restarting every role from %s (failure %d of at most %d)",
                type(error).__name__, str(error).splitlines()[0][:200],
                resume_from.name if resume_from else "the start", failures, limit)


def _actor_env(config: JobConfig) -> dict[str, str]:
    """The actors' environment: ACTOR_ENV and the run's ids (their metric tags). Ray refuses a driver
    runtime env that repeats a key of its job's (`rl-service submit` sets the submission id there),
    so keys the job's runtime env already sets are left to it."""
    import json

    from actors.process import ACTOR_ENV

    env = {**ACTOR_ENV, SUBMISSION_ID_ENV: submission_id(config.job_name), JOB_NAME_ENV: config.job_name}
    try:   # Ray's job supervisor puts the job's config, runtime env included, in this variable
        job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {}).get("env_vars")
    except (ValueError, AttributeError):
        job_env = None
    return {key: value for key, value in env.items() if key not in (job_env or {})}


def job_namespace(config: JobConfig) -> str:
    return f"rl_service-{submission_id(config.job_name)}"


def start_ray(config: JobConfig):
    """Join `cluster.address` / RAY_ADDRESS, or start a local Ray bound to 127.0.0.1 only. Returns
    the local Ray's reaper (`reap_if_driver_dies`; stop it after `ray.shutdown()`), else None."""
    address = config.cluster.address_to_join()
    if not address and os.environ.get("RAY_ADDRESS") and is_job_server_url(os.environ["RAY_ADDRESS"]):
        logging.getLogger("rl_service").warning(
            "RAY_ADDRESS=%s is a job server URL (for rl-service submit/status/...), not a cluster a run can join: "
            "this run starts its own local Ray; `rl-service submit` runs it on that cluster", os.environ["RAY_ADDRESS"])
    if not address:
        loopback_local_ray()
    import ray

    kwargs = {
        "namespace": job_namespace(config),
        "runtime_env": {"env_vars": _actor_env(config)},
        "logging_level": "WARNING",
        "log_to_driver": True,
    }
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local", never None: without an address Ray follows `ray_current_cluster`, which any
        # `ray start --head` on this machine writes, and a local run would join a stranger's cluster.
        ray.init(address="local", num_cpus=config.cluster.num_cpus, include_dashboard=config.cluster.include_dashboard,
                 dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", **kwargs)
        return reap_if_driver_dies()
    return None


def loopback_local_ray() -> None:
    """A local job serves nobody else, so every server of its Ray binds to loopback only. Ray
    resolves "127.0.0.1" to the machine's routable address unless cluster mode is off, a switch it
    reads once, when `ray._private.ray_constants` is first imported: set in the environment (the GCS
    and raylet read it there) and, where Ray is imported already (the preflight's CPU count imports
    it), on that module too. Without the second, every Ray server listened on all interfaces."""
    import sys

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        constants.ENABLE_RAY_CLUSTER = False


def reap_if_driver_dies():
    """A local Ray is this driver's: its GCS and raylet die with a SIGKILLed driver, but the dashboard,
    its agents and the runtime-env agent lingered for minutes. A shell loop in its own session
    waits for this process to end and SIGKILLs every process the local Ray had started by then
    (workers die with their raylet). Killed after a clean `ray.shutdown()`, so it never signals
    pids that were reused. None where psutil or a shell is missing."""
    import subprocess

    try:
        import psutil

        pids = [str(child.pid) for child in psutil.Process().children(recursive=True)]
        script = 'driver=$1; shift; while kill -0 "$driver" 2>/dev/null; do sleep 1; done; kill -9 "$@" 2>/dev/null; exit 0'
        return subprocess.Popen(["sh", "-c", script, "rl_service-ray-reaper", str(os.getpid()), *pids],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                close_fds=True, start_new_session=True)
    except (ImportError, OSError):
        return None


def _options(config: JobConfig, role: str, index: int, num_cpus: float, num_gpus: float = 0.0,
             resources: dict | None = None) -> dict:
    return {"name": f"{submission_id(config.job_name)}/{role}/{index}", "num_cpus": num_cpus, "num_gpus": num_gpus,
            "resources": dict(resources or {})}


def tensor_parallel_bundles(generator) -> list[dict] | None:
    """Placement-group bundles of one tensor-parallel engine (`generator.tensor_parallel` > 1 on GPUs),
    else None. One bundle per TP rank, {"GPU": 1, "CPU": num_cpus}: vLLM's Ray executor puts one worker
    (1 GPU, 0 CPU) in each; the GeneratorActor itself (the engine's driver, 0 GPU) takes bundle 0's
    CPU and the engine's custom resources, so those go to bundle 0."""
    if generator.backend != "vllm" or generator.tensor_parallel <= 1 or generator.num_gpus <= 0:
        return None
    bundles = [{"GPU": 1.0, "CPU": float(generator.num_cpus)} for _ in range(generator.tensor_parallel)]
    bundles[0].update({name: float(amount) for name, amount in generator.resources.items()})
    return bundles


def engine_resources(config: JobConfig) -> dict[str, float]:
    """What one more generator engine takes from the cluster (its whole TP group on GPUs)."""
    generator = config.generator
    bundles = tensor_parallel_bundles(generator) or [{"CPU": float(generator.num_cpus), "GPU": float(generator.num_gpus),
                                                      **{name: float(amount) for name, amount in generator.resources.items()}}]
    total: dict[str, float] = {}
    for bundle in bundles:
        for name, amount in bundle.items():
            if amount:
                total[name] = total.get(name, 0.0) + amount
    return total


POOL_CPUS = 0.01   # the generator pool actor only routes requests
INLINE_RESULT_BYTES = 8 * 1024   # a generator's results larger than this go to the shared object store


def generator_options(config: JobConfig, index: int) -> dict:
    """Ray options of generator `index`: plain resources, or (tensor parallel on GPUs) its own
    STRICT_PACK placement group, which vLLM finds from inside the actor
    (`ray.util.get_current_placement_group`) and fills with its Ray-executor TP workers."""
    generator = config.generator
    bundles = tensor_parallel_bundles(generator)
    if bundles is None:
        options = _options(config, "generator", index, generator.num_cpus, generator.num_gpus, generator.resources)
    else:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = placement_group(bundles, strategy="STRICT_PACK", name=f"{submission_id(config.job_name)}/generator/{index}")
        options = _options(config, "generator", index, generator.num_cpus, 0.0, generator.resources)
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)
    # Ray (2.60) keeps a task result smaller than its inline limit (100 KiB) in the owner's memory
    # store for good once the owner hands the result's ref on: the pool owns every shard and hands
    # it to the driver, and a quickstart shard (~78 KB) is under the limit, so the pool grew by one
    # shard per step (benchmarks/soak.py; reproduction without our code: benchmarks/ray_forwarding_rss.py
    # --payload-kib 64). Results above 8 KiB go to the shared object store instead; the actor's
    # env_vars merge with the job's.
    options["runtime_env"] = {"env_vars": {**_actor_env(config), "RAY_max_direct_call_object_size": str(INLINE_RESULT_BYTES)}}
    return options


def start_roles(config: JobConfig, verifier: str, resume_from: str | None = None) -> Roles:
    """The job's roles: the generator pool, the reward actors and the learner (continuing from the
    checkpoint `resume_from`, if given), for both job kinds: a learner group of `learner.num_ranks`
    (one rank for DPO / BVPO). A GRPO / RAFT++ job adds the statistics actor; a DPO / BVPO job
    (ALGORITHMS.md §BVPO) has none (no sample allocation), and reward actors that hold the reward
    model when `preference.reward_source` is `reward_model`."""
    import ray

    from actors.generator import GeneratorActor
    from actors.generator_pool import GeneratorPool
    from actors.reward import RewardActor
    from rl_service.rewards.custom import custom_reward_spec

    generators = [GeneratorActor.options(**generator_options(config, index)).remote(config, index)
                  for index in range(config.generator.num_engines)]
    pool = GeneratorPool.options(**_options(config, "generator_pool", 0, POOL_CPUS)).remote(
        generators, engine_resources=engine_resources(config))
    preference = config.preference
    reward_model = (preference.reward_model_path if config.algorithm.is_preference
                    and preference.reward_source == "reward_model" else None)
    custom = custom_reward_spec(config.reward)  # an absolute path: actors may not share our working directory
    rewards = [RewardActor.options(**_options(config, "reward", index, config.reward.num_cpus, config.reward.num_gpus,
                                                 config.reward.resources), **STATELESS_RESTARTS)
               .remote(verifier, config.reward.timeout_s, None, reward_model, preference.reward_model_batch_size,
                       custom=custom, clip=tuple(config.reward.clip))
               for index in range(config.reward.num_actors)]
    waits = [pool.num_engines.remote()] + [engine.weight_version.remote() for engine in generators]
    statistics = None
    if not config.algorithm.is_preference:   # preference jobs allocate no samples: no statistics role
        from actors.statistics import StatisticsActor

        statistics = StatisticsActor.options(**_options(config, "statistics", 0, config.statistics.num_cpus, 0.0,
                                                          config.statistics.resources)).remote(config.statistics)
        waits.append(statistics.allocate.remote([0], 1))
    else:
        waits += [actor.__ray_ready__.remote() for actor in rewards]
    from actors.learner_group import start_learner_group

    # The learner's ranks join while the other roles start.
    learner = start_learner_group(config, resume_from)
    # Fail here, with the actor's own error, if any role could not start.
    ray.get([learner.ready.remote()] + waits)
    return Roles(pool=pool, generators=generators, rewards=rewards, statistics=statistics, learner=learner)


@contextmanager
def ray_session(config: JobConfig, start: Callable[[JobConfig, str], Roles], verifier: str,
                run_dir: Path | None = None) -> Iterator[Roles]:
    """Ray up, the job's roles placed; on the way out engines stopped first, then Ray. With `run_dir`,
    SIGTERM stops the run with one line naming its checkpoint from the moment Ray is up, placing the
    roles included (a stop in those seconds, or minutes with vLLM, ended in Ray's stack dump)."""
    from contextlib import ExitStack

    from rl_service.driver.stop_signal import stop_on_sigterm, stop_requested

    reaper = start_ray(config)
    roles = None
    try:
        with ExitStack() as stop_signal:
            if run_dir is not None:   # after ray.init, which installs its own handler
                stop_signal.enter_context(stop_on_sigterm(run_dir))
            roles = start(config, verifier)
            yield roles
    finally:
        import ray

        if roles is not None:
            stop_roles(roles)
        ray.shutdown()
        if stop_requested() and threading.current_thread() is threading.main_thread():
            # Ray's shutdown puts SIGTERM back to its default action (its C++ UninstallSignalAction):
            # a second stop during the interpreter's exit had killed the stopped run by signal.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if reaper is not None:   # a clean end: nothing left to reap
            reaper.kill()
            reaper.wait()


def stop_roles(roles: Roles, timeout_s: float = 30.0) -> None:
    """Shut the engines down before Ray kills their processes (vLLM stops its engine core cleanly).

    Best effort: a dead or hung generator must not keep the run's results from being returned.
    """
    import ray

    refs = [engine.shutdown.remote() for engine in roles.generators]
    # The learner's weight mailbox is a file in /dev/shm: removed here, since Ray's shutdown kills
    # the process without running its cleanup (a later mailbox would remove the orphan anyway).
    ranks = getattr(roles.learner, "ranks", [])
    refs += [ranks[0].close_weight_mailbox.remote()] if ranks else []
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for ref in ready:
        try:
            ray.get(ref)
        except Exception:  # noqa: BLE001 - already failing engines are being torn down anyway
            pass

