"""Jobs on a real Ray head with token authentication, through our CLI (`rl-service submit | status |
logs | stop | list`). The head is started by the test (`ray start --head --block` on 127.0.0.1,
its own temp dir, token auth on), and stopped with its process group afterwards.
"""
from __future__ import annotations

import secrets
import time

import pytest

from conftest import SHORT_JOB, _wait_status, cli, unreachable_url

pytestmark = pytest.mark.cluster   # own Ray head or multi-node Cluster: `pytest -m cluster`


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
    # RUNNING comes before the driver has created its actors: wait for the pool first.
    deadline = time.monotonic() + 120
    for count, expected in ((0, "at least one"), (100, "free")):
        refused = cli(["scale", long_id, "--generators", str(count), "--address", address], env_with_token, timeout=300)
        while "no running generator pool" in refused.stderr and time.monotonic() < deadline:
            time.sleep(2)
            refused = cli(["scale", long_id, "--generators", str(count), "--address", address], env_with_token,
                          timeout=300)
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
    # Every command that talks to the job server, with no token and with a wrong one.
    commands = [["list"], ["status", "some-job"], ["logs", "some-job"], ["stop", "some-job"],
                ["scale", "some-job", "--generators", "2"], ["report", "some-job"], ["resume", "some-job"],
                ["submit", "configs/quickstart.yaml", *SHORT_JOB]]
    for command in commands:
        for args in ([*command, "--address", address], [*command, "--address", address, "--token-file", str(wrong_file)]):
            result = cli(args, no_token)
            assert result.returncode == 2, (args, result.stderr)
            assert len(result.stderr.strip().splitlines()) == 1 and "auth token" in result.stderr, (args, result.stderr)
            assert wrong_file.read_text() not in result.stderr


def test_the_default_token_file_is_used_with_no_variable_set(head, tmp_path):
    """`ray start --head` turns token auth on by itself and writes ~/.ray/auth_token: a shell with no
    RAY_AUTH_* variable reaches the head with that file alone, as --help says."""
    address, env, token_file = head
    home = {key: value for key, value in env.items() if not key.startswith("RAY_AUTH_")}
    home["HOME"] = str(tmp_path)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(token_file.read_text())
    listed = cli(["list", "--address", address], home)
    assert listed.returncode == 0, listed.stderr


def test_bad_addresses_and_job_ids_are_one_line_errors(head):
    address, env, token_file = head
    authenticated = {**env, "RAY_AUTH_TOKEN_PATH": str(token_file)}
    with unreachable_url() as nowhere:
        cases = [(["status", "no-such-job", "--address", address], authenticated, "no such job"),
                 (["scale", "no-such-job", "--generators", "2", "--address", address], authenticated, "no such job"),
                 (["logs", "no-such-job", "--address", address], authenticated, "no such job"),
                 (["stop", "no-such-job", "--address", address], authenticated, "no such job"),
                 (["report", "no-such-job", "--address", address], authenticated, "no such job"),
                 (["resume", "no-such-job", "--address", address], authenticated, "no such job"),
                 (["status", "x", "--address", nowhere], authenticated, "cannot reach"),
                 (["submit", "configs/quickstart.yaml", "--address", address, "--set", "learner.lr=-1"], authenticated,
                  "learner.lr"),
                 (["list", "--address", address, "--token-file", "/nonexistent/token"], authenticated, "no such file")]
        for args, environment, expected in cases:
            result = cli(args, environment)
            assert result.returncode == 2 and expected in result.stderr, (args, result.stderr)
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
