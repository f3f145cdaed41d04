"""Live metrics (rl_service/telemetry.py): the pure mapping from a step's metrics dict to the
`rl_service_*` metrics, and, with a real Ray on 127.0.0.1, that those metrics reach the node's
Prometheus endpoint as `ray_rl_service_*` with the job tag, from the driver and from a named
GeneratorPool actor.
"""
from __future__ import annotations

import logging
import math
import os
import re
import time
import urllib.request

import pytest

from rl_service.driver.roles import JOB_NAME_ENV, SUBMISSION_ID_ENV
from rl_service.telemetry import (
    ROLE_TAG, TAG_KEYS, MetricRecorder, MetricValue, loop_metric_values, queue_depth_values, run_tags,
    run_tags_from_env, step_metric_values,
)
from rl_service.telemetry_names import JOB_TAG, METRIC_NAMES, PROMETHEUS_NAMESPACE, SUBMISSION_TAG

# A local Ray binds its servers to loopback only when this is set before `ray` is first imported
# (the same as rl_service/driver/roles.py start_ray does for a local job).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

JOB = "telemetry_test"
SUBMISSION = "telemetry_test-20261206-040000-abc123"
TAGS = run_tags(JOB, SUBMISSION)

# One GRPO step's metrics as Trainer.train_step builds them (abridged to the keys telemetry reads,
# plus some it must ignore), with a GVM allocation and a weight sync.
GRPO_STEP = {
    "reward_mean": 0.375,
    "accepted_fraction": 0.25,
    "completion_length_mean": 17.0,
    "completions_per_s": 210.5,
    "tokens_per_s": 3600.0,
    "weight_version": 7.0,
    "weight_sync_bytes": 4.5e6,
    "weight_sync_seconds": 0.042,
    "allocation_samples_min": 2.0,
    "allocation_samples_median": 8.0,
    "allocation_samples_max": 14.0,
    "allocation_zero_fraction": 0.0,
    "step_seconds": 1.2,
    "loss": -0.0123,
    "kl_k3_mean": 0.0042,
    "grad_norm": 0.51,
    "generator_engines": 2.0,
}


def by_name(values: list[MetricValue]) -> dict[str, MetricValue]:
    names = [value.name for value in values]
    assert len(names) == len(set(names)), names
    return {value.name: value for value in values}


# -- the pure mapping ----------------------------------------------------------------------------

def test_a_grpo_step_maps_onto_its_live_metrics():
    values = by_name(step_metric_values(GRPO_STEP, TAGS))
    assert {name: value.value for name, value in values.items()} == {
        "rl_service_reward_mean": 0.375,
        "rl_service_accepted_fraction": 0.25,
        "rl_service_samples_per_second": 210.5,
        "rl_service_tokens_per_second": 3600.0,
        "rl_service_weight_version": 7.0,
        "rl_service_sync_seconds": 0.042,
        "rl_service_gvm_allocation_spread": 12.0,     # max - min samples per prompt
        "rl_service_loss": -0.0123,
        "rl_service_kl": 0.0042,
        "rl_service_grad_norm": 0.51,
        "rl_service_generator_engines": 2.0,
    }
    assert all(value.tags == {JOB_TAG: JOB, SUBMISSION_TAG: SUBMISSION} for value in values.values())


def test_the_loop_records_its_step_and_every_evaluation():
    assert loop_metric_values(7, None, TAGS) == [MetricValue("rl_service_step", 7.0, TAGS)]
    assert loop_metric_values(10, {"eval_accuracy": 0.5625, "eval_seconds": 3.0}, TAGS) == [
        MetricValue("rl_service_step", 10.0, TAGS), MetricValue("rl_service_eval_accuracy", 0.5625, TAGS)]
    assert loop_metric_values(0, {}, TAGS) == [MetricValue("rl_service_step", 0.0, TAGS)]   # no eval split


def test_absent_and_non_finite_keys_record_nothing():
    # A BVPO step: no accepted fraction, no allocation, no sync; alpha-hat present; a NaN reward
    # mean (a step without samples) must not overwrite the gauge's last good value.
    bvpo_step = {"reward_mean": math.nan, "completions_per_s": 12.0, "weight_version": 3.0, "bvpo_alpha": 0.61,
                 "allocation_samples_max": 4.0}   # a spread needs both ends
    values = by_name(step_metric_values(bvpo_step, run_tags("bvpo_job", "bvpo_job-1")))
    assert {name: value.value for name, value in values.items()} == {
        "rl_service_samples_per_second": 12.0, "rl_service_weight_version": 3.0, "rl_service_alpha_hat": 0.61}
    assert step_metric_values({}, TAGS) == []


def test_queue_depth_is_one_series_per_engine():
    values = queue_depth_values([8, 0, 3], TAGS)
    assert [(value.name, value.value, value.tags) for value in values] == [
        ("rl_service_generator_queue_depth", float(depth), {**TAGS, ROLE_TAG: f"generator/{index}"})
        for index, depth in enumerate([8, 0, 3])]
    # Engines 3 and 4 retired by a scale-down: their series are set to 0, not left at their last depth.
    assert [value.tags[ROLE_TAG] for value in queue_depth_values([0, 0], TAGS, first=3)] == ["generator/3", "generator/4"]


def test_every_named_metric_is_recorded_with_the_tags_it_declares():
    """Nothing in telemetry_names is left without a source, and every record carries exactly the tag
    keys its metric declares (Ray rejects a record missing one)."""
    everything = (step_metric_values({**GRPO_STEP, "bvpo_alpha": 0.5}, TAGS) + queue_depth_values([1, 2], TAGS)
                  + loop_metric_values(3, {"eval_accuracy": 0.5}, TAGS))
    assert {value.name for value in everything} == set(METRIC_NAMES)
    for value in everything:
        assert tuple(value.tags) == TAG_KEYS[value.name] and JOB_TAG in value.tags and SUBMISSION_TAG in value.tags


def test_an_actor_takes_its_run_tags_from_the_environment_the_run_gives_it(monkeypatch):
    monkeypatch.delenv(JOB_NAME_ENV, raising=False)
    monkeypatch.delenv(SUBMISSION_ID_ENV, raising=False)
    assert run_tags_from_env() is None            # a bare pool outside any run records nothing
    monkeypatch.setenv(JOB_NAME_ENV, JOB)
    assert run_tags_from_env() is None            # both ids or none
    monkeypatch.setenv(SUBMISSION_ID_ENV, SUBMISSION)
    assert run_tags_from_env() == {JOB_TAG: JOB, SUBMISSION_TAG: SUBMISSION}


def test_a_failing_exporter_warns_once_and_never_raises(caplog):
    class BrokenGauge:
        calls = 0

        def set(self, value, tags):
            BrokenGauge.calls += 1
            raise RuntimeError("metrics agent unreachable")

    recorder = MetricRecorder()
    recorder._metrics["rl_service_reward_mean"] = BrokenGauge()
    with caplog.at_level(logging.WARNING, logger="rl_service.telemetry"):
        for _ in range(3):
            recorder.record(step_metric_values(GRPO_STEP, TAGS))
    assert BrokenGauge.calls == 1 and not recorder.enabled
    assert len([record for record in caplog.records if "live metrics are off" in record.message]) == 1


# -- the real exporter ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_with_metrics_port():
    import ray

    # Processes report to the node's metrics agent every metrics_report_interval_ms (10 s by
    # default); 1 s keeps the test short. The agent (ray[default]) serves them on a port it binds
    # itself (no _metrics_export_port: a free port picked here and released could be taken by another
    # process before the agent bound it), read back from the node's record.
    # The run's ids reach its actors through the runtime env, as rl_service/driver/roles.py start_ray passes them.
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             _system_config={"metrics_report_interval_ms": 1000}, logging_level="WARNING",
             runtime_env={"env_vars": {JOB_NAME_ENV: JOB, SUBMISSION_ID_ENV: SUBMISSION}})
    try:
        (node,) = ray.nodes()
        port = node["MetricsExportPort"]
        assert port > 0, node
        yield port
    finally:
        ray.shutdown()


SAMPLE_LINE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)\{(?P<labels>.*)\} (?P<value>\S+)$")


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    """(series name, labels, value) of every labelled sample on the node's Prometheus endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = []
    for line in text.splitlines():
        match = SAMPLE_LINE.match(line)
        if match:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match["labels"]))
            samples.append((match["name"], labels, float(match["value"])))
    return samples


def wait_for_series(port: int, wanted: dict[tuple[str, tuple[tuple[str, str], ...]], float], timeout_s: float = 180.0):
    """Poll the endpoint until every (series name, label subset) has its value; returns the last scrape.
    A deadline, not a timing check: on a loaded 2-core machine the node's metrics agent took over
    30 s to serve the first series (no rl_service series at all after 30 s; 10 s when quiet)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            samples = scrape(port)
        except OSError:      # the agent not serving yet (refused), or too slow to answer this time
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
            continue
        found = {key: value for key in wanted for name, labels, value in samples
                 if name == key[0] and set(key[1]) <= set(labels.items())}
        if found == wanted or time.monotonic() > deadline:
            return found, samples
        time.sleep(0.5)


def prom(name: str) -> str:
    return f"{PROMETHEUS_NAMESPACE}_{name}"


@pytest.mark.slow
def test_driver_and_pool_metrics_reach_prometheus(ray_with_metrics_port, monkeypatch):
    import ray

    from actors.generator_pool import GeneratorPool
    from rl_service.rollout import GenerationRequest, SamplingParams
    from rl_service.telemetry import StepTelemetry

    # Engines that do no work: the pool's queue depth counts what it hands out, not what runs.
    @ray.remote(num_cpus=0)
    class IdleEngine:
        def generate(self, shard, sampling, seed):
            return len(shard)

    pool = GeneratorPool.options(name=f"{SUBMISSION}/generator_pool/0", num_cpus=0).remote([IdleEngine.remote(), IdleEngine.remote()])
    requests = [GenerationRequest(index, index, [1, 2, 3], 4) for index in range(4)]
    assert ray.get(ray.get(pool.generate.remote(requests, SamplingParams(max_new_tokens=8), seed=0))) == [2, 2]
    assert ray.get(pool.outstanding_work.remote()) == [0, 0]    # finished shards are dropped from its books

    # The driver side, exactly as Trainer.train_step records a step.
    monkeypatch.setenv(SUBMISSION_ID_ENV, SUBMISSION)   # what `rl-service submit` / `run` set for the driver
    telemetry = StepTelemetry(JOB)
    telemetry.record_step(GRPO_STEP)
    telemetry.record_loop(10, {"eval_accuracy": 0.5625})   # as the loop does after an evaluation

    job = ((JOB_TAG, JOB), (SUBMISSION_TAG, SUBMISSION))
    wanted = {
        (prom("rl_service_step"), job): 10.0,
        (prom("rl_service_eval_accuracy"), job): 0.5625,
        (prom("rl_service_loss"), job): -0.0123,
        (prom("rl_service_kl"), job): 0.0042,
        (prom("rl_service_grad_norm"), job): 0.51,
        (prom("rl_service_generator_engines"), job): 2.0,
        (prom("rl_service_reward_mean"), job): 0.375,
        (prom("rl_service_weight_version"), job): 7.0,
        (prom("rl_service_gvm_allocation_spread"), job): 12.0,
        (prom("rl_service_sync_seconds"), job): 0.042,
        # 16 samples split evenly over two idle engines.
        (prom("rl_service_generator_queue_depth"), job + ((ROLE_TAG, "generator/0"),)): 8.0,
        (prom("rl_service_generator_queue_depth"), job + ((ROLE_TAG, "generator/1"),)): 8.0,
    }
    found, samples = wait_for_series(ray_with_metrics_port, wanted)
    ours = sorted({name for name, _, _ in samples if "rl_service" in name})
    assert found == wanted, f"missing or wrong: {set(wanted.items()) - set(found.items())}; rl_service series seen: {ours}"
