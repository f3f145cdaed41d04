"""The generator pool grows and shrinks while a job runs (`rl-service scale`'s request, applied by
the driver between two hand-outs), on a `ray.cluster_utils.Cluster` with a rollout node and a
learner node: the run completes and its ledger holds every step's prompts exactly once, the same
prompts an unscaled run trains on. A scale to 0 or beyond the rollout node's resources is refused.
Meanwhile the run's `rl_service_*` metrics appear on the head's Prometheus endpoint."""
from __future__ import annotations

import json
import threading
import time

import pytest

from conftest import REPO, read_metrics, short_run_overrides
from rl_service.config import load_config
from rl_service.data.sampler import PromptSampler

pytestmark = pytest.mark.cluster   # own Ray head or multi-node Cluster: `pytest -m cluster`

NAMESPACE_ID = "elastic-test"
STEPS = 10


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    # The head's metrics agent binds a port of its own choosing (`_head_metrics_port` reads it back):
    # a free port picked here and released could be taken before the agent bound it.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "_system_config": {"metrics_report_interval_ms": 1000}})
    cluster.add_node(num_cpus=2, resources={"rollout": 2})
    cluster.add_node(num_cpus=2, resources={"learner": 1})
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def _wait_for_step(run_dir, step: int, timeout_s: float = 300.0, engines: float | None = None) -> None:
    """Until a trained step >= `step` is logged (with `engines` generator engines, if given)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
        if any(row.get("step", -1) >= step and "reward_mean" in row
               and (engines is None or row.get("generator_engines") == engines) for row in rows):
            return
        time.sleep(0.5)
    raise TimeoutError(f"step {step} not reached")


def _head_metrics_port(cluster, timeout_s: float = 120.0) -> int:
    """The Prometheus port of the head's metrics agent, as the head reports it (Ray connected)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ports = [node.get("MetricsExportPort") for node in ray.nodes() if node["NodeID"] == cluster.head_node.node_id]
        if ports and ports[0]:
            return int(ports[0])
        time.sleep(0.5)
    raise TimeoutError("the head never reported its metrics export port")


def _scrape_until(port: int, needle: str, timeout_s: float = 60.0) -> str:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            if needle in text:
                return text
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{needle} never appeared on the metrics endpoint")


def test_scaling_from_one_to_two_generators_and_back_trains_every_prompt_once(cluster, tmp_path, monkeypatch):
    from rl_service.driver import prepare_job, run_training, trainer
    from rl_service.driver.elastic import request_scale

    monkeypatch.setenv("RL_SERVICE_SUBMISSION_ID", NAMESPACE_ID)
    config = load_config(REPO / "configs" / "quickstart.yaml", short_run_overrides(steps=STEPS) + [
        f"cluster.address={cluster.address}", "generator.backend=hf", "generator.num_engines=1",
        "generator.resources={rollout: 1}", "generator.num_cpus=0.5", "learner.resources={learner: 1}",
        "cluster.torch_threads=1", "eval_every=0", "checkpoint.every=0"])
    namespace = f"rl_service-{NAMESPACE_ID}"
    refusals: list[str] = []
    failures: list[BaseException] = []
    scraped: list[str] = []

    grown, shrunk = threading.Event(), threading.Event()

    def scale_during_the_run():
        try:
            _wait_for_step(tmp_path, 2)
            for count in (0, 3):   # 0 engines; 2 more engines than the rollout node's {rollout: 2}
                with pytest.raises(ValueError) as refused:
                    request_scale(namespace, count)
                refusals.append(str(refused.value))
            request_scale(namespace, 2)
            grown.set()
            _wait_for_step(tmp_path, 1, engines=2.0)
            request_scale(namespace, 1)
            shrunk.set()
            scraped.append(_scrape_until(_head_metrics_port(cluster), 'ray_rl_service_reward_mean{'))
        except BaseException as error:  # noqa: BLE001 - reported by the test thread below
            failures.append(error)
        finally:
            grown.set()
            shrunk.set()

    # Steps 4 and 8 are launched only once this thread's requests are in: on a loaded CI machine the 10
    # steps had ended before the first request reached the pool. The real scale is applied either way.
    launches: list[int] = []
    apply_requested_scale = trainer.apply_requested_scale

    def apply_once_requested(roles, config_, weight_version):
        launches.append(weight_version)
        gate = {4: grown, 8: shrunk}.get(len(launches))
        if gate is not None:
            gate.wait(300)
        return apply_requested_scale(roles, config_, weight_version)

    monkeypatch.setattr(trainer, "apply_requested_scale", apply_once_requested)

    scaler = threading.Thread(target=scale_during_the_run, daemon=True)
    scaler.start()
    job = prepare_job(config)
    summary = run_training(job, tmp_path)
    scaler.join(60)
    assert not failures, failures
    assert summary["stopped_reason"] == "completed"
    # The live metrics reached the head's Prometheus endpoint while the run went on, tagged by job.
    assert 'job_name="quickstart"' in scraped[0] and "ray_rl_service_weight_version" in scraped[0]
    assert "at least one engine" in refusals[0] and "rollout" in refusals[1] and "free" in refusals[1]

    engines = [row["generator_engines"] for row in read_metrics(tmp_path) if "generator_engines" in row]
    assert len(engines) == STEPS and engines[0] == 1.0 and 2.0 in engines and engines[-1] == 1.0
    ledger = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    sampler = PromptSampler(len(job.task.train), config.data.prompts_per_step, config.seed)
    expected = [[job.task.train[index].prompt_id for index in sampler.next_batch()] for _ in range(STEPS)]
    assert [row["step"] for row in ledger] == list(range(1, STEPS + 1))
    assert [row["prompt_ids"] for row in ledger] == expected
    budget = config.data.prompts_per_step * config.generator.samples_per_prompt
    assert all(sum(row["samples"]) == budget for row in ledger)
