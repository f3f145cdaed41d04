"""The right cluster, with a real `ray start --head` up (issue #18 findings 3-4, issue #19 findings 1-2):
an explicit `--address` beats RAY_ADDRESS for every job command, and a local run with no address
starts its own Ray (never the head that `ray_current_cluster` names), every listener of it on
127.0.0.1 (looked at with psutil while the run trains).
"""
from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO, SHORT_JOB, cli, unreachable_url

pytestmark = pytest.mark.cluster   # starts its own Ray head (the `head` fixture)



def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)      # ::ffff:127.0.0.1, an IPv6 socket on IPv4 loopback
    return (mapped or address).is_loopback


def test_an_explicit_address_beats_ray_address_for_every_job_command(head):
    address, env, token_file = head
    authenticated = {**env, "RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_ADDRESS": address,
                     "RAY_API_SERVER_ADDRESS": address}
    commands = [["list"], ["status", "some-job"], ["logs", "some-job"], ["stop", "some-job"],
                ["scale", "some-job", "--generators", "2"], ["report", "some-job"], ["resume", "some-job"],
                ["submit", "configs/quickstart.yaml", *SHORT_JOB]]
    with unreachable_url() as nowhere:
        for command in commands:
            # The environment names a live head; the command line names a dead address: the dead one is used.
            result = cli([*command, "--address", nowhere], authenticated)
            assert result.returncode == 2, (command, result.stdout, result.stderr)
            assert "cannot reach" in result.stderr and nowhere in result.stderr, (command, result.stderr)
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        # ... and the other way round: a dead RAY_ADDRESS does not hide the live head named on the line.
        dead_env = {**authenticated, "RAY_ADDRESS": nowhere, "RAY_API_SERVER_ADDRESS": nowhere}
        listed = cli(["list", "--address", address], dead_env)
        assert listed.returncode == 0 and listed.stdout.startswith("job id"), listed.stderr


def test_a_local_run_starts_its_own_ray_on_loopback_beside_a_running_head(head, tmp_path):
    address, env, token_file = head
    # The head was started with --temp-dir=<scratch>/ray, the default temp dir for RAY_TMPDIR=<scratch>:
    # its `ray_current_cluster` is exactly what a plain `ray.init()` of this run would follow.
    scratch = token_file.parent
    assert (scratch / "ray" / "ray_current_cluster").is_file()
    local_env = {key: value for key, value in env.items()
                 if key not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    local_env["RAY_TMPDIR"] = str(scratch)
    # deploy/README.md has users export the head's job server URL for the job commands; a driver cannot
    # join a cluster by that URL, so with it set a run is still a local one (and says so).
    local_env["RAY_ADDRESS"] = address
    run_dir = tmp_path / "run"
    overrides = [*SHORT_JOB, "--set", "steps=4", "--set", "cluster.include_dashboard=true"]
    process = subprocess.Popen([sys.executable, "-m", "rl_service.cli", "run", "configs/quickstart.yaml",
                                "--run-dir", str(run_dir), *overrides],
                               env=local_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    listeners: set[tuple[str, int, str]] = set()
    try:
        while process.poll() is None:
            listeners |= _listeners(process.pid)
            time.sleep(0.5)
        output = process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output[-3000:]
    assert "InvalidAuthToken" not in output and "existing Ray cluster" not in output, output[-3000:]
    assert f"RAY_ADDRESS={address} is a job server URL" in output, output[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4
    # Ray's servers (GCS, raylet, object manager, dashboard and its agents, workers' gRPC), the
    # learner's process-group store and gloo's pairs: many listeners, every one on loopback.
    assert len(listeners) >= 5, listeners
    assert [listener for listener in sorted(listeners) if not _loopback(listener[0])] == []


def _listeners(root_pid: int) -> set[tuple[str, int, str]]:
    """(ip, port, process name) of every listening TCP/UDP socket in `root_pid`'s process tree."""
    found = set()
    try:
        root = psutil.Process(root_pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for process in processes:
        try:
            name = process.name()
            for connection in process.net_connections(kind="inet"):
                if connection.status == psutil.CONN_LISTEN or (connection.type == 2 and not connection.raddr):
                    found.add((connection.laddr.ip, connection.laddr.port, name))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found
