"""Checks before Ray starts (rl_service/driver/preflight.py): what Ray would wait on for ever becomes one line."""
from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from rl_service.config import load_config
from rl_service.driver.preflight import (check_cluster_reachable, check_job_server_answers, gcs_host_port,
                                         local_resource_shortfall)
from rl_service.errors import UserError

from test_cli import REPO, rl_service


def test_a_local_ray_that_cannot_place_the_roles_is_named_by_field():
    assert local_resource_shortfall(load_config(REPO / "configs" / "quickstart.yaml"), cpus=2, gpus=0) is None
    gpus = local_resource_shortfall(load_config(None, ["generator.num_gpus=1", "generator.num_engines=2"]), 2, 0)
    assert "ask for 2 GPU (generator: 2)" in gpus and "has 0 GPUs" in gpus
    # 64 ranks of 0.5 CPU, 1 engine of 0.25, 1 reward actor of 0.25, statistics 0.1, the pool 0.01.
    cpus = local_resource_shortfall(load_config(None, ["learner.num_ranks=64"]), cpus=2, gpus=0)
    assert "ask for 32.61 CPU" in cpus and "learner: 32" in cpus and "generator pool: 0.01" in cpus
    # Exactly the CPUs there are, but for the pool's 0.01: one actor would wait for ever.
    assert "ask for 2.01 CPU" in local_resource_shortfall(
        load_config(None, ["generator.num_cpus=1.0", "reward.num_cpus=0.4"]), cpus=2, gpus=0)
    # Resources a local Ray declares by itself are there.
    assert local_resource_shortfall(load_config(None, ['learner.resources={"accelerator_type:H100": 0.001}',
                                                       "learner.num_gpus=1"]), cpus=16, gpus=1) is None
    custom = local_resource_shortfall(load_config(None, ["generator.resources={rollout: 1}"]), cpus=2, gpus=0)
    assert "custom resource 'rollout'" in custom and "generator: 1" in custom
    assert local_resource_shortfall(load_config(None, ["generator.num_gpus=1"]), cpus=2, gpus=1) is None


def test_a_local_vllm_job_without_vllm_is_refused_before_ray_starts(monkeypatch):
    # Its generators died in Ray's ActorDiedError traceback (exit 1) after Ray started. Python's own
    # way of saying a module is absent: None in sys.modules (import and find_spec both honour it).
    from rl_service.driver.preflight import check_cluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(UserError, match="generator.backend vllm: vLLM is not installed here"):
        check_cluster(load_config(None, ["generator.backend=vllm", "cluster.num_cpus=2"]))
    check_cluster(load_config(None, ["generator.backend=torch", "cluster.num_cpus=2"]))


def test_cluster_addresses_are_parsed_and_a_closed_port_is_refused_fast():
    assert gcs_host_port("10.0.0.1:6379") == ("10.0.0.1", 6379)
    assert gcs_host_port("ray://head:10001") == ("head", 10001)
    assert gcs_host_port("auto") is None
    # A port nobody listens on, kept bound (never listening) while it is checked: one bound, closed
    # and then checked could be taken by a listener of another process in between.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(UserError, match=rf"cluster.address 127.0.0.1:{port}: cannot reach a Ray cluster there"):
            check_cluster_reachable(f"127.0.0.1:{port}", timeout_s=5)
        assert time.monotonic() - started < 5
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        check_cluster_reachable(f"127.0.0.1:{listener.getsockname()[1]}")   # something answers: Ray's turn


def test_a_job_server_that_accepts_and_never_answers_is_refused_within_the_timeout():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()   # the kernel accepts connections; nobody ever replies
        address = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(UserError, match="accepted the connection but did not answer within 1 s"):
            check_job_server_answers(address, timeout_s=1)


def test_any_http_answer_counts_as_a_job_server_that_answers():
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check_job_server_answers(f"http://127.0.0.1:{server.server_port}", timeout_s=5)
    finally:
        server.shutdown()


def test_run_refuses_roles_a_local_ray_cannot_place_before_ray_starts(tmp_path):
    result = rl_service("run", "configs/quickstart.yaml", "--set", "generator.num_gpus=1", "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "local run: the roles ask for 1 GPU (generator: 1)" in lines[0], result.stderr
    # Nothing written, and the directory the run made is gone (one holding only a lock file was left
    # behind for every refused try); a directory that was there before stays.
    assert not (tmp_path / "r").exists()
    (tmp_path / "mine").mkdir()
    assert rl_service("run", "configs/quickstart.yaml", "--set", "generator.num_gpus=1",
                      "--run-dir", str(tmp_path / "mine")).returncode == 2
    assert (tmp_path / "mine").is_dir()


def test_resume_refuses_a_run_that_already_trained_its_steps(tmp_path):
    from conftest import fake_checkpoint

    run = tmp_path / "run"
    fake_checkpoint(run, 2)
    (run / "config.yaml").write_text("steps: 2\n")
    result = rl_service("resume", str(run))
    assert result.returncode == 2 and "already trained 2 steps and its config says steps: 2" in result.stderr
    assert "--set steps=N` with N > 2" in result.stderr


def test_a_local_ray_started_after_the_preflight_listens_on_loopback_only():
    # The preflight's CPU count imports Ray, which reads its cluster-mode switch once, at import: set
    # afterwards, it came too late and every Ray server of a local run listened on all interfaces.
    script = """
import json, sys, time
import psutil
from rl_service.config import load_config
from rl_service.driver.preflight import check_cluster
from rl_service.driver.roles import start_ray
config = load_config("configs/quickstart.yaml")
check_cluster(config)
assert "ray" in sys.modules   # the order that went wrong
start_ray(config)
import ray
time.sleep(2)
found = set()
for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
    try:
        connections = process.net_connections(kind="inet")
    except psutil.Error:   # a short-lived helper process that is gone already
        continue
    found |= {connection.laddr.ip for connection in connections if connection.status == psutil.CONN_LISTEN}
print(json.dumps({"node": ray.util.get_node_ip_address(), "listeners": sorted(found)}))
ray.shutdown()
"""
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env["RAY_TMPDIR"] = scratch = tempfile.mkdtemp(prefix="rlp", dir="/tmp")   # short: Ray's socket paths
    try:
        result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=300)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["node"] == "127.0.0.1"
    assert len(seen["listeners"]) >= 1
    assert [ip for ip in seen["listeners"] if ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")] == []
