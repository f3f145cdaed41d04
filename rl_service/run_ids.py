"""A run's identity: its submission id and job name, as the driver hands them to its actors.

Its own module (no Ray, no roles) because the actors' telemetry reads it and the role start-up
(`rl_service/driver/roles.py`) writes it; telemetry importing roles would make a cycle through the actors.
"""
from __future__ import annotations

import os
import time
import uuid

SUBMISSION_ID_ENV = "RL_SERVICE_SUBMISSION_ID"   # set by `rl-service submit` in the job's runtime env
JOB_NAME_ENV = "RL_SERVICE_JOB_NAME"             # the config's job_name, for the actors' metric tags
_process_run_id: dict[str, str] = {}
# The job this process was started as: `rl-service submit` / `resume JOB` set SUBMISSION_ID_ENV in the job's
# runtime env, before any code here ran; a local run sets it itself later (cli._run_id), so it is read
# once, at import. None for a local run: what a stop tells its user to resume differs.
SUBMITTED_JOB_ID = os.environ.get(SUBMISSION_ID_ENV)


def new_submission_id(job_name: str) -> str:
    """`<job_name>-<YYYYmmdd-HHMMSS>-<6 hex>`: what `rl-service submit` names a job, and a local run."""
    return f"{job_name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def submission_id(job_name: str) -> str:
    """The id of this run: the submission id of a submitted job (`rl-service run` sets one for a local
    run too), else one made up once per process and job name. It names the job's Ray namespace
    (`rl-service scale` finds its pool there), prefixes its actors' names and tags its metrics, so
    two runs of one config stay apart in the dashboard and in Prometheus."""
    return os.environ.get(SUBMISSION_ID_ENV) or _process_run_id.setdefault(job_name, new_submission_id(job_name))
