"""Jobs on a real Ray head with token authentication, through our CLI (`rl-service submit | status |
logs | stop | list`). The head is started by the test (`ray start --head --block` on 127.0.0.1,
its own temp dir, token auth on), and stopped with its process group afterwards.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    from rl_service.training.engine import free_port

    return free_port()


@pytest.fixture(scope="module")
def head():
    """(job server URL, environment of an authenticated client) of a fresh token-auth head."""
    scratch = Path(tempfile.mkdtemp(prefix="rlsj", dir="/tmp"))   # short: Ray's socket paths have a length limit
    token_file = scratch / "token"
    token_file.write_text(secrets.token_hex(32))
    dashboard_port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={_free_port()}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
         f"--temp-dir={scratch / 'ray'}", "--num-cpus=4", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for(address, token_file.read_text(), process)
        client_env = {key: value for key, value in env.items() if key != "RAY_AUTH_TOKEN_PATH"}
        yield address, client_env, token_file
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        shutil.rmtree(scratch, ignore_errors=True)


def _wait_for(address: str, token: str, process, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start --head exited with {process.returncode}")
        request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the head's job server at {address} did not come up in {timeout_s:g} s")


def cli(args: list[str], env: dict, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rl_service.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _wait_status(job_id: str, address: str, env: dict, wanted: set[str], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    status = "?"
    while time.monotonic() < deadline:
        result = cli(["status", job_id, "--address", address], env)
        assert result.returncode == 0, result.stderr
        status = result.stdout.strip()
        if status in wanted:
            return status
        time.sleep(2)
    raise AssertionError(f"job {job_id} still {status} after {timeout_s:g} s")


SHORT_JOB = ["--set", "steps=2", "--set", "eval_every=0", "--set", "data.prompts_per_step=2",
             "--set", "generator.samples_per_prompt=2", "--set", "data.arithmetic.num_eval=4",
             "--set", "generator.backend=hf", "--set", "generator.max_new_tokens=16", "--set", "schedule.mode=sync",
             "--set", "logging.progress_bar=false", "--set", "checkpoint.every=0"]


def test_submit_status_logs_list_and_stop(head):
    address, env, token_file = head
    submitted = cli(["submit", "configs/quickstart.yaml", "--address", address, "--token-file", str(token_file),
                     *SHORT_JOB], env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    assert job_id.startswith("quickstart-")
    env_with_token = {**env, "RAY_AUTH_TOKEN_PATH": str(token_file)}
    assert _wait_status(job_id, address, env_with_token, {"SUCCEEDED", "FAILED", "STOPPED"}, 300) == "SUCCEEDED", \
        cli(["logs", job_id, "--address", address], env_with_token).stdout[-3000:]
    logs = cli(["logs", job_id, "--address", address], env_with_token)
    assert logs.returncode == 0 and "stopped_reason" in logs.stdout and "completed" in logs.stdout
    listed = cli(["list", "--address", address], env_with_token)
    assert listed.returncode == 0 and job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    assert token_file.read_text() not in submitted.stdout + submitted.stderr + logs.stdout + listed.stdout

    long_job = cli(["submit", "configs/quickstart.yaml", "--address", address, *SHORT_JOB, "--set", "steps=100000"],
                   env_with_token)
    assert long_job.returncode == 0, long_job.stderr
    long_id = long_job.stdout.strip().splitlines()[-1]
    _wait_status(long_id, address, env_with_token, {"RUNNING"}, 120)
    # Scale the running job's pool: refused for 0 and for more than the head's CPUs, done for 2.
    for count, expected in ((0, "at least one"), (100, "free")):
        refused = cli(["scale", long_id, "--generators", str(count), "--address", address], env_with_token, timeout=300)
        assert refused.returncode == 2 and expected in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    scaled = cli(["scale", long_id, "--generators", "2", "--address", address], env_with_token, timeout=300)
    assert scaled.returncode == 0 and "2 generator engine(s)" in scaled.stdout, scaled.stderr
    deadline = time.monotonic() + 120
    while "generator pool: 1 -> 2 engines" not in cli(["logs", long_id, "--address", address], env_with_token).stdout:
        assert time.monotonic() < deadline, "the job never applied the scale request"
        time.sleep(2)
    stopped = cli(["stop", long_id, "--address", address], env_with_token)
    assert stopped.returncode == 0 and "stopping" in stopped.stdout
    assert _wait_status(long_id, address, env_with_token, {"STOPPED", "FAILED", "SUCCEEDED"}, 120) == "STOPPED"


def test_clients_without_the_right_token_are_refused_in_one_line(head, tmp_path):
    address, env, _ = head
    no_token = {**env, "HOME": str(tmp_path)}            # no ~/.ray/auth_token either
    no_token.pop("RAY_AUTH_MODE", None)
    wrong_file = tmp_path / "wrong"
    wrong_file.write_text(secrets.token_hex(32))
    for args, environment in ((["list", "--address", address], no_token),
                              (["list", "--address", address, "--token-file", str(wrong_file)], no_token)):
        result = cli(args, environment)
        assert result.returncode == 2, result
        assert len(result.stderr.strip().splitlines()) == 1 and "auth token" in result.stderr
        assert wrong_file.read_text() not in result.stderr


def test_bad_addresses_and_job_ids_are_one_line_errors(head):
    address, env, token_file = head
    authenticated = {**env, "RAY_AUTH_TOKEN_PATH": str(token_file)}
    cases = [(["status", "no-such-job", "--address", address], authenticated, "no such job"),
             (["scale", "no-such-job", "--generators", "2", "--address", address], authenticated, "no such job"),
             (["logs", "no-such-job", "--address", address], authenticated, "no such job"),
             (["status", "x", "--address", f"http://127.0.0.1:{_free_port()}"], authenticated, "cannot reach"),
             (["submit", "configs/quickstart.yaml", "--address", address, "--set", "learner.lr=-1"], authenticated,
              "learner.lr"),
             (["list", "--address", address, "--token-file", "/nonexistent/token"], authenticated, "no such file")]
    for args, environment, expected in cases:
        result = cli(args, environment)
        assert result.returncode == 2 and expected in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
