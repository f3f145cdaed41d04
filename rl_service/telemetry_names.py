"""The names of the live metrics rl_service exports through `ray.util.metrics` (DESIGN.md
"Monitoring"), in one place: the code that records them and `deploy/grafana/rl_service.json` that
charts them must agree, and `tests/test_deploy_manifests.py` checks the dashboard against this list.

Ray's Prometheus exporter puts every user metric under its `ray` namespace, so a metric recorded
as `rl_service_reward_mean` is scraped as `ray_rl_service_reward_mean`. Every metric is a gauge:
Ray's agent keeps a histogram's or counter's series for as long as it runs, long after their job
ended, where a gauge goes two report intervals after its process. Every metric carries the tag
`JOB_TAG` (the config's `job_name`) and `SUBMISSION_TAG` (the submission id, `<job_name>-<time>-<hex>`,
which a local run gets too): the dashboard's `job` and `submission` variables filter on them. The tag
is not called `job` because Prometheus sets its own `job` label (the scrape job) on every series
and would rename ours to `exported_job`.

Pure: no Ray import, so the dashboard test and any tool can read the names without Ray.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

PROMETHEUS_NAMESPACE = "ray"   # Ray's exporter prefixes user metrics with "ray_"
JOB_TAG = "job_name"
SUBMISSION_TAG = "submission_id"   # the run's id: tells two runs of one config apart


class MetricSpec(NamedTuple):
    name: str
    kind: Literal["gauge"]   # only gauges end with their job (see above)
    description: str


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("rl_service_reward_mean", "gauge", "mean reward of the last step's training completions"),
    MetricSpec("rl_service_accepted_fraction", "gauge", "fraction of the last step's completions with reward 1 (accepted)"),
    MetricSpec("rl_service_samples_per_second", "gauge", "completions generated per second over the last step"),
    MetricSpec("rl_service_tokens_per_second", "gauge", "completion tokens generated per second over the last step"),
    MetricSpec("rl_service_weight_version", "gauge", "weight version the learner last published (generators serve it)"),
    MetricSpec("rl_service_sync_seconds", "gauge", "seconds the last weight version took to reach every generator"),
    MetricSpec("rl_service_gvm_allocation_spread", "gauge",
               "samples given to the most-served prompt minus the least-served in the last allocation (0: uniform)"),
    MetricSpec("rl_service_alpha_hat", "gauge", "BVPO's online estimate of the trace/empty mixing weight alpha"),
    MetricSpec("rl_service_generator_queue_depth", "gauge", "generation requests waiting in the generator pool"),
    MetricSpec("rl_service_step", "gauge", "last training step finished"),
    MetricSpec("rl_service_loss", "gauge", "training loss of the last step (policy or preference loss)"),
    MetricSpec("rl_service_kl", "gauge", "k3 KL term of the last step as it enters the loss (algorithm.kl_coef > 0)"),
    MetricSpec("rl_service_grad_norm", "gauge", "global gradient norm of the last step, before clipping"),
    MetricSpec("rl_service_eval_accuracy", "gauge", "greedy accuracy on the eval split at the latest evaluation"),
    MetricSpec("rl_service_generator_engines", "gauge", "generator engines in the job's pool"),
)

# name -> one-line description: the single list the metrics code and the dashboard share.
METRIC_NAMES: dict[str, str] = {metric.name: metric.description for metric in METRICS}

_SERIES_SUFFIXES = {"gauge": ("",), "counter": ("_total", ""), "histogram": ("_bucket", "_sum", "_count")}


def prometheus_series(name: str) -> tuple[str, ...]:
    """The series names Prometheus holds for metric `name` (a counter also keeps its old gauge
    series unless RAY_EXPORT_COUNTER_AS_GAUGE=0, hence both for counters)."""
    kind = {metric.name: metric.kind for metric in METRICS}[name]   # KeyError: not one of ours
    return tuple(f"{PROMETHEUS_NAMESPACE}_{name}{suffix}" for suffix in _SERIES_SUFFIXES[kind])
