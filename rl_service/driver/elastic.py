"""Elastic generator pool: `rl-service scale JOB --generators N` while the job runs.

`rl-service scale` runs no Ray job: it writes the request into Ray's internal KV store through the
job server's authenticated package-upload endpoint (`PUT /api/packages/gcs/<key>`, the one HTTP
route that writes the KV; see `scale_request_key`), and the job's driver, which polls its own keys
(`ScaleListener`), hands it to the job's `GeneratorPool`, which checks it against the cluster's free
resources; the driver's answer is one log line, `scale <request id>: ...`, which the command waits
for in the job's log. So `list` and the dashboard show only real jobs, and a refused scale fails
nothing. The driver applies it at
its next launch, between steps' hand-outs, so no request is ever split across a change:
- growing: each new engine is placed like the others, loads the weights the pool serves *before*
  the pool sends it anything, then joins;
- shrinking: the pool stops sending to the last engines, their unfinished shards are waited for (the
  samples are kept: they belong to steps that will be trained), then the engines are shut down.
So no prompt is lost or sampled twice for a step; `ledger.jsonl` records what each step trained.
Scaling needs the object-store weight transport (a collective group has a fixed membership).
"""
from __future__ import annotations

import json
import logging
import threading

from rl_service.config import JobConfig

log = logging.getLogger("rl_service")


def apply_requested_scale(roles, config: JobConfig, weight_version: int) -> int | None:
    """Apply a pending `scale` request; returns the new engine count, or None if none was pending."""
    import ray

    from actors.generator import GeneratorActor
    from rl_service.driver.roles import generator_options
    from rl_service.driver.weight_sync import use_collective

    target = ray.get(roles.pool.requested_engines.remote())
    if target is None:
        return None
    current = len(roles.generators)
    if use_collective(config):
        log.warning("scale to %d generators ignored: weight_sync.transport 'collective' has a fixed group", target)
        ray.get(roles.pool.request_engines.remote(current))
        return None
    if target > current:
        new = [GeneratorActor.options(**generator_options(config, index)).remote(config, index)
               for index in range(current, target)]
        published = roles.learner.publish_weights.remote(weight_version, via_object_store=True)
        ray.get([engine.load_weights.remote(published) for engine in new])   # current weights first
        ray.get(roles.pool.add_engines.remote(new))
        roles.generators.extend(new)
    else:
        for engine, unfinished in ray.get(roles.pool.retire_engines.remote(current - target)):
            ray.wait(unfinished, num_returns=len(unfinished), fetch_local=False)
            ray.get(engine.shutdown.remote())
            ray.kill(engine)
        del roles.generators[target:]
    log.info("generator pool: %d -> %d engines", current, target)
    return target


def autoscale_target(engines: int, generate_seconds: float, train_seconds: float, minimum: int, maximum: int) -> int:
    """The pool size for the next steps (ours): one more engine while generation takes longer than
    training (the learner waits on it), one fewer while it takes under half as long (engines idle
    for most of a step), else as it is; always within [minimum, maximum]."""
    if generate_seconds > train_seconds and engines < maximum:
        return engines + 1
    if generate_seconds < 0.5 * train_seconds and engines > minimum:
        return engines - 1
    return max(minimum, min(maximum, engines))


class Autoscaler:
    """Feeds `autoscale_target` the mean generate and train seconds of every `every` steps and asks the
    pool for the result; the pool refuses what the cluster's free resources cannot hold."""

    def __init__(self, roles, config: JobConfig):
        self.roles, self.settings = roles, config.generator.autoscale
        self.window: list[tuple[float, float]] = []

    def observe(self, metrics: dict) -> None:
        import ray

        self.window.append((metrics.get("time_generate_s", 0.0), metrics.get("time_train_s", 0.0)))
        if len(self.window) < self.settings.every:
            return
        generate = sum(seconds for seconds, _ in self.window) / len(self.window)
        train = sum(seconds for _, seconds in self.window) / len(self.window)
        self.window.clear()
        engines = len(self.roles.generators)
        target = autoscale_target(engines, generate, train, self.settings.min, self.settings.max)
        if target == engines:
            return
        try:
            ray.get(self.roles.pool.request_engines.remote(target))
        except ray.exceptions.RayTaskError as error:
            log.info("autoscale: staying at %d engines (%s)", engines, error.cause)


def request_scale(namespace: str, count: int) -> str:
    """Ask the pool of the job in `namespace` for `count` engines (Ray connected); returns a line to
    print. Raises ValueError with a one-line reason when the job or the count is wrong."""
    import ray

    pools = [name for name in ray.util.list_named_actors() if name.endswith("/generator_pool/0")]
    if not pools:
        raise ValueError(f"no running generator pool in {namespace} (has the job started, and was it submitted "
                         "with rl-service submit?)")
    pool = ray.get_actor(pools[0], namespace=namespace)
    try:
        ray.get(pool.request_engines.remote(count))
    except ray.exceptions.RayTaskError as error:
        raise ValueError(str(error.cause) if error.cause is not None else str(error)) from None
    return f"{count} generator engine(s) from the next step"


SCALE_KEY_PREFIX = "gcs://rl_service_scale_"
SCALE_POLL_S = 1.0


def scale_request_key(submission_id: str, request_id: str) -> str:
    """The KV key of one scale request of a job. The `gcs://` form is what the upload endpoint
    stores under (`ray._private.runtime_env.packaging.upload_package_to_gcs`); nothing else reads
    these keys, and the driver deletes each one it answers."""
    return f"{SCALE_KEY_PREFIX}{submission_id}.{request_id}"


def scale_answer(request_id: str, text: str) -> str:
    """The driver's log line answering a request; `rl-service scale` looks for its prefix."""
    return f"scale {request_id}: {text}"


class ScaleListener:
    """A daemon thread of the driver that answers the job's scale requests from the KV store, one
    a second, until `stop()`: each is passed to the pool (`request_engines`, applied by the driver
    at its next launch) and answered in the log."""

    def __init__(self, pool, submission_id: str, refusal: str | None = None):
        self.pool, self.prefix, self.refusal = pool, scale_request_key(submission_id, ""), refusal
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rl_service-scale-listener", daemon=True)
        self._thread.start()

    @classmethod
    def for_trainer(cls, config: JobConfig, trainer) -> "ScaleListener | None":
        roles = getattr(trainer, "roles", None)
        if roles is None or getattr(roles, "pool", None) is None:
            return None
        from rl_service.driver.roles import submission_id

        refusal = None
        if config.algorithm.is_preference:
            refusal = f"scaling applies to grpo and raft++ jobs; a {config.algorithm.name} job keeps its pool"
        return cls(roles.pool, submission_id(config.job_name), refusal)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(SCALE_POLL_S):
            try:
                self.poll()
            except Exception as error:  # noqa: BLE001 - a KV hiccup must not end the run; next poll retries
                log.warning("scale requests: %s: %s", type(error).__name__, error)

    def poll(self) -> None:
        import ray
        from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get, _internal_kv_list

        for raw_key in _internal_kv_list(self.prefix):
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            request_id = key[len(self.prefix):]
            body = _internal_kv_get(key)
            _internal_kv_del(key)
            try:
                count = int(json.loads(body)["generators"])
            except (TypeError, ValueError, KeyError):
                log.info(scale_answer(request_id, "refused: not a scale request"))
                continue
            if self.refusal is not None:
                log.info(scale_answer(request_id, f"refused: {self.refusal}"))
                continue
            try:
                ray.get(self.pool.request_engines.remote(count))
            except ray.exceptions.RayTaskError as error:
                reason = " ".join(str(error.cause if error.cause is not None else error).split())
                log.info(scale_answer(request_id, f"refused: {reason}"))
                continue
            log.info(scale_answer(request_id, f"{count} generator engine(s) from the next step"))
