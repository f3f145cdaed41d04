"""Live metrics through `ray.util.metrics` (DESIGN.md "Monitoring"): what a run's steps record for
Ray's dashboard and Prometheus, next to the run directory's `metrics.jsonl`.

What is recorded, and where:

- The driver (`Trainer.train_step`, `PreferenceTrainer.train_step`) records each step's metrics dict
  with `StepTelemetry.record_step`: reward mean, accepted fraction, samples/s, tokens/s, weight
  version, weight sync seconds, loss, KL, grad norm, engine count, GVM allocation spread, BVPO's
  α̂. A key the step did not produce (no GVM, no BVPO, no KL term) records nothing.
- The generator pool (actors/generator_pool.py) records its queue depth per engine each time it
  hands out work: it alone knows what each engine still has to do, and asking it from the driver
  after a step would always read 0 in sync mode (the driver waits for every shard first).
- The loop (rl_service/driver/step_loop.py) records the step number and each evaluation's accuracy.

Names and kinds are `rl_service/telemetry_names.py`. Every metric carries the `job_name` tag (the
config's `job_name`) and the `submission_id` tag (the run's id, rl_service/driver/roles.py), so two runs
of one config are two series; the queue depth also a `role` tag naming the engine the way its actor
is named without the run (`generator/0`, `generator/1`, ...), so that per-engine series stay apart.
Every metric is a gauge, so a run's series end with it: Ray's agent drops a gauge its process has
not re-reported for two report intervals, while histograms and counters are cumulative in the
agent and were still exported for hours after their job (tests/test_prometheus.py checks that an
ended job's series go). The weight sync seconds are therefore the last publication's, one gauge;
Grafana charts their spread with `quantile_over_time`.

How a user sees them: every Ray node's metrics agent (part of `ray[default]`, which the install
brings) serves the metrics of that node's processes, driver included, in Prometheus format on the
node's metrics export port (`ray start --metrics-export-port=8080`, or `ray.init(_metrics_export_port=...)`;
8080 in deploy/). Ray's exporter prefixes user metrics with `ray_`: `rl_service_reward_mean` is
scraped as `ray_rl_service_reward_mean`. With a Prometheus scraping the cluster
(deploy/prometheus/prometheus.yml reads the head's service-discovery file) and Grafana next to it,
the Ray dashboard's Metrics tab charts Ray's own metrics, and `deploy/grafana/rl_service.json` is a
dashboard of exactly these, filtered by `job_name` and `submission_id`. Processes report to their
agent every `metrics_report_interval_ms` (10 s by default), so a value appears on the endpoint
within about that long after it is recorded.

Telemetry never fails a run: if `ray.util.metrics` is missing or raises, one warning is logged and
recording stops for that process; training goes on. `step_metric_values` and
`queue_depth_values` are the pure mappings (no Ray), tested on their own.
"""
from __future__ import annotations

import logging
import math
from typing import Mapping, NamedTuple, Sequence

import os

from rl_service.telemetry_names import JOB_TAG, METRICS, SUBMISSION_TAG

log = logging.getLogger(__name__)

ROLE_TAG = "role"

# Tag keys of each metric: a Ray metric declares its keys when created and must get all of them on
# every record. The per-engine queue depth is the one metric recorded per role instance.
RUN_TAGS = (JOB_TAG, SUBMISSION_TAG)
TAG_KEYS: dict[str, tuple[str, ...]] = {
    metric.name: RUN_TAGS + (ROLE_TAG,) if metric.name == "rl_service_generator_queue_depth" else RUN_TAGS
    for metric in METRICS
}

# One step's metrics dict key -> the live metric it feeds (read as is; the spread is derived below).
STEP_KEY_TO_METRIC: dict[str, str] = {
    "reward_mean": "rl_service_reward_mean",
    "accepted_fraction": "rl_service_accepted_fraction",
    "completions_per_s": "rl_service_samples_per_second",
    "tokens_per_s": "rl_service_tokens_per_second",
    "weight_version": "rl_service_weight_version",
    "weight_sync_seconds": "rl_service_sync_seconds",    # rl_service/driver/weight_sync.py, every publish
    "bvpo_alpha": "rl_service_alpha_hat",                # AlphaEstimator.metrics(), BVPO's online α̂
    "loss": "rl_service_loss",
    "kl_k3_mean": "rl_service_kl",                        # policy_loss(), only with a KL term
    "grad_norm": "rl_service_grad_norm",
    "generator_engines": "rl_service_generator_engines",
}
# Recorded by the loop (rl_service/driver/step_loop.py), which knows the step and every evaluation.
STEP_METRIC, EVAL_METRIC = "rl_service_step", "rl_service_eval_accuracy"
# allocation_spread_metrics (rl_service/algorithms/gvm.py) via the statistics actor: n_i's extremes.
ALLOCATION_MAX_KEY, ALLOCATION_MIN_KEY = "allocation_samples_max", "allocation_samples_min"


class MetricValue(NamedTuple):
    name: str                  # one of telemetry_names.METRIC_NAMES
    value: float
    tags: dict[str, str]


def _finite(value) -> float | None:
    """The value as a float, or None when it is missing or not finite: a NaN reward mean (an empty
    step) would otherwise wipe the gauge's last good value."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def run_tags(job_name: str, submission_id: str) -> dict[str, str]:
    return {JOB_TAG: job_name, SUBMISSION_TAG: submission_id}


def run_tags_from_env() -> dict[str, str] | None:
    """The run's tags in one of its actors (rl_service/driver/roles.py start_ray puts both ids in every
    actor's environment), or None in a process no run started (a test's bare pool): no metrics."""
    from rl_service.run_ids import JOB_NAME_ENV, SUBMISSION_ID_ENV

    job_name, submission = os.environ.get(JOB_NAME_ENV), os.environ.get(SUBMISSION_ID_ENV)
    return run_tags(job_name, submission) if job_name and submission else None


def step_metric_values(metrics: Mapping[str, float], tags: Mapping[str, str]) -> list[MetricValue]:
    """The live metrics one training step's metrics dict (what the driver logs to metrics.jsonl)
    records; keys the step did not produce are skipped."""
    values = []
    for key, name in STEP_KEY_TO_METRIC.items():
        value = _finite(metrics.get(key))
        if value is not None:
            values.append(MetricValue(name, value, dict(tags)))
    most, least = _finite(metrics.get(ALLOCATION_MAX_KEY)), _finite(metrics.get(ALLOCATION_MIN_KEY))
    if most is not None and least is not None:
        values.append(MetricValue("rl_service_gvm_allocation_spread", most - least, dict(tags)))
    return values


def loop_metric_values(step: int, evaluation: Mapping[str, float] | None, tags: Mapping[str, str]) -> list[MetricValue]:
    """The step just finished and, when the loop evaluated, the eval accuracy."""
    values = [MetricValue(STEP_METRIC, float(step), dict(tags))]
    accuracy = _finite((evaluation or {}).get("eval_accuracy"))
    if accuracy is not None:
        values.append(MetricValue(EVAL_METRIC, accuracy, dict(tags)))
    return values


def queue_depth_values(outstanding_samples: Sequence[int], tags: Mapping[str, str], first: int = 0) -> list[MetricValue]:
    """One queue depth per engine, engines `first`, `first` + 1, ...: samples sent to it whose results
    are not ready yet."""
    return [MetricValue("rl_service_generator_queue_depth", float(samples), {**tags, ROLE_TAG: f"generator/{index}"})
            for index, samples in enumerate(outstanding_samples, start=first)]


class MetricRecorder:
    """Records MetricValues into `ray.util.metrics`, creating each metric on first use, in the
    process that calls it (Ray exports a process's metrics through its node's agent).

    Never raises: the first failure (no `ray.util.metrics`, Ray not up, a rejected value) logs one
    warning and turns recording off in this process, since a broken exporter would fail every step
    the same way and a run must not stop over its dashboards."""

    def __init__(self):
        self._metrics: dict[str, object] = {}
        self.enabled = True

    def record(self, values: Sequence[MetricValue]) -> None:
        if not self.enabled:
            return
        try:
            for name, value, tags in values:
                metric = self._metrics.get(name) or self._create(name)
                metric.set(value, tags=tags)
        except Exception as error:  # noqa: BLE001 - telemetry must never fail a run
            self.enabled = False
            log.warning("live metrics are off for this process (%s: %s); the run goes on and still "
                        "writes metrics.jsonl", type(error).__name__, error)

    def _create(self, name: str):
        from ray.util import metrics as ray_metrics

        description = next(metric.description for metric in METRICS if metric.name == name)
        metric = ray_metrics.Gauge(name, description=description, tag_keys=TAG_KEYS[name])
        self._metrics[name] = metric
        return metric


class StepTelemetry:
    """The driver's live metrics: `record_step(metrics)` once per training step (the trainer),
    `record_loop(step, evaluation)` after it (the loop, which knows the step and the evaluations)."""

    def __init__(self, job_name: str):
        from rl_service.run_ids import submission_id

        self.tags = run_tags(job_name, submission_id(job_name))
        self.recorder = MetricRecorder()

    def record_step(self, metrics: Mapping[str, float]) -> None:
        self.recorder.record(step_metric_values(metrics, self.tags))

    def record_loop(self, step: int, evaluation: Mapping[str, float] | None = None) -> None:
        self.recorder.record(loop_metric_values(step, evaluation, self.tags))
