"""Elastic generator pool: `rl-service scale JOB --generators N` while the job runs.

The request goes to the job's `GeneratorPool` (found by name in the job's namespace, which is its
submission id) and is checked there against the cluster's free resources. The driver applies it at
its next launch, between steps' hand-outs, so no request is ever split across a change:
- growing: each new engine is placed like the others, loads the weights the pool serves *before*
  the pool sends it anything, then joins;
- shrinking: the pool stops sending to the last engines, their unfinished shards are waited for (the
  samples are kept: they belong to steps that will be trained), then the engines are shut down.
So no prompt is lost or sampled twice for a step; `ledger.jsonl` records what each step trained.
Scaling needs the object-store weight transport (a collective group has a fixed membership).

    python -m rl_service.elastic SUBMISSION_ID N     (what `rl-service scale` runs on the cluster)
"""
from __future__ import annotations

import logging
import sys

from rl_service.config import JobConfig

log = logging.getLogger("rl_service")


def apply_requested_scale(roles, config: JobConfig, weight_version: int) -> int | None:
    """Apply a pending `scale` request; returns the new engine count, or None if none was pending."""
    import ray

    from actors.generator import GeneratorActor
    from rl_service.roles import generator_options
    from rl_service.weight_sync import use_collective

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
        published = roles.learner.publish_weights.remote(weight_version)
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


def main(argv: list[str]) -> int:
    import ray

    submission_id, count = argv[0], int(argv[1])
    namespace = f"rl_service-{submission_id}"
    ray.init(address="auto", namespace=namespace, logging_level="ERROR", log_to_driver=False)
    try:
        print(f"{submission_id}: {request_scale(namespace, count)}")
        return 0
    except ValueError as error:
        print(f"rl-service: error: {error}")
        return 2
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
