"""A user's day with jobs on a real token-auth `ray start --head` (issue #18): where results land,
live progress in the job's log, `scale` without helper jobs, the dashboard's Name column, `report`
and `resume` of the same job by its id, and Ray's message for a failed job.

The head is tests/conftest.py's (own temp dir and token, torn down by its process group, never
`ray stop`).
"""
from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import SHORT_JOB, _wait_status, cli

pytestmark = pytest.mark.cluster   # own Ray head: `pytest -m cluster`

# SHORT_JOB's sizes, run long, with the defaults under test: checkpoint.every (automatic) and the bar (on).
LONG_JOB = [item for flag, value in zip(SHORT_JOB[::2], SHORT_JOB[1::2])
            if value.split("=")[0] not in ("steps", "checkpoint.every", "logging.progress_bar", "eval_every")
            for item in (flag, value)] + ["--set", "steps=100000", "--set", "eval_every=2"]


def _job_id(result) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def _wait_for_log(job_id: str, address: str, env: dict, needle: str, timeout_s: float = 180) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        logs = cli(["logs", job_id, "--address", address], env).stdout
        if needle in logs:
            return logs
        assert time.monotonic() < deadline, f"{needle!r} never appeared in {job_id}'s log: {logs[-3000:]}"
        time.sleep(2)


def test_submit_scale_stop_report_and_resume_one_job_by_its_id(head, tmp_path):
    address, env, token_file = head
    env = {**env, "RAY_AUTH_TOKEN_PATH": str(token_file)}
    submitted = cli(["submit", "configs/quickstart.yaml", "--address", address, *LONG_JOB,
                     "--set", f"logging.output_dir={tmp_path}"], env)
    job_id = _job_id(submitted)
    run_dir = tmp_path / job_id                        # <logging.output_dir>/<job id>, absolute
    assert f"run directory: {run_dir}" in submitted.stderr

    # Finding 2: the log shows each step while the job runs (the bar is on by default; the log is no terminal).
    logs = _wait_for_log(job_id, address, env, "step 3/100000 | reward")
    driver_lines = logs.split("Running entrypoint for job", 1)[1].splitlines()[1:]   # after Ray's own lines
    assert driver_lines[0] == f"run directory: {run_dir}"   # finding 1: the driver's first line, absolute
    assert "eval step 0 | accuracy" in logs and "eval step 2 | accuracy" in logs   # evaluations while it runs

    # Finding 7: scaling is answered by the job itself; no helper job appears, a refusal fails nothing.
    refused = cli(["scale", job_id, "--generators", "100", "--address", address], env, timeout=300)
    assert refused.returncode == 2 and "free" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    scaled = cli(["scale", job_id, "--generators", "2", "--address", address], env, timeout=300)
    assert scaled.returncode == 0 and "2 generator engine(s)" in scaled.stdout, scaled.stderr
    _wait_for_log(job_id, address, env, "generator pool: 1 -> 2 engines")
    # What the dashboard's job table reads (its Name column is metadata.job_name).
    request = urllib.request.Request(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token_file.read_text()}"})
    jobs = json.loads(urllib.request.urlopen(request, timeout=30).read())
    assert [job["submission_id"] for job in jobs if job.get("submission_id")] == [job_id]   # no scale-... jobs
    assert jobs[0]["metadata"]["job_name"] == "quickstart"

    # Finding 1: a job on a cluster checkpoints without being told to, so a stopped one can resume.
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "latest").is_file():
        assert time.monotonic() < deadline, "no checkpoint by default"
        time.sleep(2)
    stopped = cli(["stop", job_id, "--address", address], env)
    assert stopped.returncode == 0
    assert _wait_status(job_id, address, env, {"STOPPED", "FAILED", "SUCCEEDED"}, 120) == "STOPPED"

    reported = cli(["report", job_id, "--address", address], env, timeout=300)
    assert reported.returncode == 0, reported.stderr
    assert any(Path(line).parent == run_dir / "report" for line in reported.stdout.splitlines())

    checkpoint_step = int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step_"))
    resumed = cli(["resume", job_id, "--address", address, "--set", f"steps={checkpoint_step + 2}"], env)
    resumed_id = _job_id(resumed)
    assert resumed_id != job_id and f"run directory: {run_dir}" in resumed.stderr
    assert _wait_status(resumed_id, address, env, {"SUCCEEDED", "FAILED", "STOPPED"}, 300) == "SUCCEEDED", \
        cli(["logs", resumed_id, "--address", address], env).stdout[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == checkpoint_step + 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = sorted({row["step"] for row in rows if "reward_mean" in row})
    assert trained == list(range(1, checkpoint_step + 3))           # each step once, in the same directory
    assert cli(["report", resumed_id, "--address", address], env, timeout=300).returncode == 0


def test_a_failed_job_shows_rays_message_and_a_missing_path_never_leaves(head):
    address, env, token_file = head
    env = {**env, "RAY_AUTH_TOKEN_PATH": str(token_file)}
    local = cli(["submit", "configs/quickstart.yaml", "--address", address, *SHORT_JOB,
                 "--set", "model.path=/nonexistent/model"], env)
    assert local.returncode == 2 and "model.path /nonexistent/model" in local.stderr
    failing = cli(["submit", "configs/quickstart.yaml", "--address", address, *SHORT_JOB, "--no-local-check",
                   "--set", "model.path=/nonexistent/model"], env)
    job_id = _job_id(failing)
    assert _wait_status(job_id, address, env, {"SUCCEEDED", "FAILED", "STOPPED"}, 300) == "FAILED"
    status = cli(["status", job_id, "--address", address], env)
    assert status.returncode == 0
    lines = status.stdout.splitlines()
    assert lines[0] == "FAILED"
    assert "exit code 2" in status.stdout and "model.path" in status.stdout, status.stdout
    followed = cli(["logs", job_id, "--follow", "--address", address], env)   # a script learns how it ended
    assert followed.returncode == 1 and "model.path" in followed.stdout, followed.stderr
