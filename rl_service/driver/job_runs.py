"""Where a submitted job's results land, and the commands that find them again by job id.

`rl-service submit` decides the run directory on the submitting machine, before anything is sent:
`--run-dir DIR`, else `<logging.output_dir>/<job id>` (`runs/<job id>` by default), made absolute
against the working directory (a relative path inside the job would resolve inside Ray's copy of
the working directory, `<ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_*/`,
which Ray deletes). The job runs `rl-service run CONFIG --run-dir <that path>` and the path is kept
in the job's metadata (`rl_service_run_dir`), so `rl-service report JOB_ID` and `rl-service resume
JOB_ID` find the run without anyone looking inside Ray's temp dir. On one machine the default is the
user's own `runs/`; on a multi-node cluster the path must be on storage every node mounts (the
learner writes the checkpoint's model on its own node), so there it is `--run-dir /mnt/shared/...`
or `logging.output_dir: /mnt/shared/runs` in the config.

`submit` also checks the paths a config names (model, data, preference data, reward model, custom
reward file) on this machine: a missing one is one line and exit code 2 here, instead of a job that
fails on the cluster. `--no-local-check` skips that for paths that exist only on the cluster.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from rl_service.driver.job_upload import config_paths
from rl_service.errors import UserError

RUN_DIR_METADATA = "rl_service_run_dir"
RUN_DIR_LOG_PREFIX = "run directory: "   # the first line `rl-service run` prints


def check_local_paths(config, working_dir: Path) -> None:
    """Raise a one-line UserError for the first path the config names that is not on this machine
    (relative paths are relative to the working directory, which the job receives)."""
    for field, value in config_paths(config):
        path = Path(value).expanduser()
        if not (path if path.is_absolute() else working_dir / path).exists():
            raise UserError(f"{field} {value}: no such file or directory on this machine (pass --no-local-check "
                            "if it exists only on the cluster's nodes)")


def refuse_paths_leaving(config, working_dir: Path) -> None:
    """A relative path that leaves the working directory (`../rewards/r.py`) never reaches the job,
    which receives only what is inside it: refused here, since the job failed on it with a path inside
    Ray's temp directory. An absolute path is the job's to read where it is (shared storage)."""
    from rl_service.driver.job_upload import relative_inside, config_paths

    for field, value in config_paths(config):
        path = Path(value).expanduser()
        if not path.is_absolute() and relative_inside(path) is None:   # the upload's own rule
            raise UserError(f"{field} {value}: outside the working directory ({working_dir}), which is all a "
                            "submitted job receives: move it inside, or name it by an absolute path on storage "
                            "the cluster's nodes mount")


def submit_run_dir(run_dir: str | None, config, job_id: str, working_dir: Path) -> Path:
    """The absolute run directory of a job about to be submitted (see the module docstring)."""
    from rl_service.driver.run_dir import refuse_empty_run_dir

    refuse_empty_run_dir(run_dir)
    path = Path(run_dir) if run_dir else Path(config.logging.output_dir) / job_id
    path = path.expanduser()
    return path if path.is_absolute() else (working_dir / path).resolve()


def job_run_dir(client, job_id: str, call) -> Path:
    """The run directory of a submitted job: its metadata (jobs submitted by `rl-service submit` or
    `resume`), else the `run directory:` line its driver printed first (a `ray job submit` of
    `rl-service run`). `call(action)` turns SDK errors into one-line UserErrors."""
    info = call(lambda: client.get_job_info(job_id))
    path = (info.metadata or {}).get(RUN_DIR_METADATA)
    if not path:
        logs = call(lambda: client.get_job_logs(job_id))
        path = next((line.split(RUN_DIR_LOG_PREFIX, 1)[1].strip() for line in logs.splitlines()
                     if RUN_DIR_LOG_PREFIX in line), None)
    if not path:
        raise UserError(f"job {job_id}: no run directory recorded (not an rl-service job, or its driver has not "
                        "started yet)")
    return Path(path)


def is_job_id(value: str) -> bool:
    """A job id names no path: no '/', and nothing of that name here."""
    return "/" not in value and not Path(value).exists()


def as_job_id(value: str, command):
    """`command()` for a name `is_job_id` took for a job id; its error also says that no run
    directory has that name here: a mistyped run directory is as likely as a job id."""
    try:
        return command()
    except KnownJobError:
        raise
    except UserError as error:
        raise UserError(f"{value}: no run directory of that name here; as a job id: {error}") from None


class KnownJobError(UserError):
    """An error about a job that was found: `as_job_id` adds no guess that the name was a run directory."""


def report_job(args) -> Path:
    """The run directory of job `args.run_dir` for `rl-service report JOB_ID`, checked to be readable here."""
    from rl_service.driver.job_client import job_server_client, sdk_call

    client = job_server_client(_as_job(args))
    run_dir = job_run_dir(client, args.run_dir, lambda action: sdk_call(args, action))
    if not (run_dir / "metrics.jsonl").is_file():
        status = sdk_call(args, lambda: client.get_job_status(args.run_dir)).value
        if status == "FAILED":   # "not started yet" misled: `rl-service status` has why
            raise UserError(f"job {args.run_dir} FAILED before its run directory {run_dir} held any metrics here: "
                            f"`rl-service status {args.run_dir}` says why")
        raise UserError(f"job {args.run_dir}: its run directory {run_dir} has no metrics.jsonl on this machine (not "
                        f"started yet, or on the cluster's storage: run `rl-service report {run_dir}` where it is)")
    return run_dir


def resume_job(args) -> int:
    """`rl-service resume JOB_ID`: a new job on the same cluster that continues the job's run
    directory from its newest checkpoint (`rl-service resume RUN_DIR` there); prints the new id."""
    import sys

    from rl_service.driver.job_client import UPLOAD_EXCLUDES, job_server_client, sdk_call, submit_job
    from rl_service.driver.job_upload import FILES_METADATA, job_files, staged_working_dir
    from rl_service.driver.roles import SUBMISSION_ID_ENV, new_submission_id

    client = job_server_client(_as_job(args))
    call = lambda action: sdk_call(args, action)   # noqa: E731 - errors name the job asked about
    run_dir = job_run_dir(client, args.run_dir, call)
    status = call(lambda: client.get_job_status(args.run_dir)).value
    if status in ("PENDING", "RUNNING"):
        raise KnownJobError(f"job {args.run_dir} is {status}: stop it first (`rl-service stop {args.run_dir}`)")
    from rl_service.config import load_config
    from rl_service.driver.run_dir import resumable_checkpoint

    saved = None
    if (run_dir / "config.yaml").is_file():   # the run is visible here: what the job would find, checked now
        try:
            saved = load_config(run_dir / "config.yaml", args.overrides)
            resumable_checkpoint(run_dir, saved)
        except UserError as error:   # its advice in the job's terms: `resume RUN_DIR` would train here, not there
            advice = str(error).replace(f"rl-service resume {run_dir}", f"rl-service resume {args.run_dir}")
            raise KnownJobError(f"job {args.run_dir}: {advice}") from None
    metadata = call(lambda: client.get_job_info(args.run_dir)).metadata or {}
    job_name = metadata.get("job_name") or "rl_service"
    job_id = new_submission_id(job_name)
    entrypoint = " ".join(["python", "-m", "rl_service.cli", "resume", shlex.quote(str(run_dir))]
                          + [f"--set {shlex.quote(override)}" for override in args.overrides])
    # The files the first job received (its config's relative paths resolve against them), from here.
    working_dir = Path.cwd().resolve()
    received = json.loads(metadata.get(FILES_METADATA, "[]"))
    missing = missing_job_files(working_dir, received)
    # None of them here: another directory, where the new job got none of them and failed on the cluster. (One
    # gone, a config renamed since, say, need not matter: the job resumes from the run's own config.yaml.)
    if received and len(missing) == len(received):
        raise KnownJobError(f"job {args.run_dir}: the files it was submitted with are not here ({', '.join(missing[:3])}"
                            f"{' ...' if len(missing) > 3 else ''}): run `rl-service resume {args.run_dir}` from the "
                            "directory it was submitted from")
    files = job_files(working_dir, saved, also=received)
    with staged_working_dir(working_dir, files) as stage:
        submit_job(_as_job(args), client, entrypoint=entrypoint, submission_id=job_id,
                   metadata={"job_name": job_name, "rl_service_job": job_name, RUN_DIR_METADATA: str(run_dir),
                             "rl_service_resumes": args.run_dir, FILES_METADATA: json.dumps(list(map(str, files)))},
                   runtime_env={"working_dir": str(stage), "excludes": UPLOAD_EXCLUDES,
                                "env_vars": {SUBMISSION_ID_ENV: job_id}})
    print(f"{RUN_DIR_LOG_PREFIX}{run_dir}", file=sys.stderr)
    print(job_id)
    return 0


def missing_job_files(working_dir: Path, received: list[str]) -> list[str]:
    """The files a job received (relative to where it was submitted) that `working_dir` lacks."""
    return [name for name in received if not (working_dir / name).exists()]


def _as_job(args):
    """`args` with `job_id` set, which the SDK error messages of rl_service/driver/jobs.py name."""
    from rl_service.driver.job_client import check_job_id

    check_job_id(args.run_dir)
    args.job_id = args.run_dir
    return args
