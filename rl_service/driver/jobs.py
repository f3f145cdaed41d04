"""`rl-service submit | status | logs | stop | list | scale`: jobs on a Ray cluster through the Ray Jobs SDK.

`submit` validates the config here first (a typo or a missing local path fails before anything
reaches the cluster), then sends `python -m rl_service.cli run CONFIG --run-dir DIR --set ...` with
the files the job needs as its working directory (the config, the local paths it names, the code of
an rl_service checkout: rl_service/driver/job_upload.py; never the rest of the directory), and the submission id in `RL_SERVICE_SUBMISSION_ID`, which names the
job's Ray namespace, prefixes its actors' names and tags its metrics. DIR is absolute and kept in
the job's metadata, so `report` and `resume` find the run by job id (rl_service/driver/job_runs.py).
`scale` writes its request into the cluster's KV store, where the job's driver picks it up
(rl_service/driver/elastic.py): no helper job.

Authentication is Ray's token auth: the token comes from `--token-file`, `RAY_AUTH_TOKEN` or
`RAY_AUTH_TOKEN_PATH` (Ray's own variables; `~/.ray/auth_token` last), and is sent as a bearer
header by the SDK. It is never printed: errors name the address and the cause only.
Every failure a user can cause (unreachable address, missing or wrong token, unknown job id) is one
line and exit code 2; nothing on the cluster is touched by a failed command.
"""
from __future__ import annotations

import asyncio
import json
import shlex
import sys
import time
import uuid
from pathlib import Path

from rl_service.errors import UserError
from rl_service.driver.job_client import UPLOAD_EXCLUDES, cause, connection, job_server_client, sdk_call, server_address, submit_job
from rl_service.driver.job_upload import FILES_METADATA, job_files, staged_working_dir
from rl_service.driver.roles import SUBMISSION_ID_ENV

def add_job_commands(commands) -> None:
    """The job subcommands on the CLI's subparsers."""
    submit = commands.add_parser("submit", help="submit a job to a Ray cluster (Ray Jobs)")
    submit.add_argument("config", help="YAML job file inside the working directory (uploaded with it)")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set learner.lr=1e-5 (repeatable; checked here, "
                             "applied by the job)")
    submit.add_argument("--run-dir", help="the run directory, as the cluster's nodes see it (default: "
                                          "<logging.output_dir>/<job id>, absolute from here)")
    submit.add_argument("--no-local-check", action="store_true",
                        help="do not check the job here (that its paths exist, and validate's checks of its data, "
                             "model and reward): its files are on the cluster only")
    connection(submit)
    for name, text in (("status", "a job's status"), ("stop", "stop a running job")):
        command = commands.add_parser(name, help=text)
        command.add_argument("job_id")
        connection(command)
    logs = commands.add_parser("logs", help="a job's driver log")
    logs.add_argument("job_id")
    logs.add_argument("--follow", action="store_true", help="keep printing until the job ends; exit code 1 if it failed")
    connection(logs)
    connection(commands.add_parser("list", help="jobs on the cluster"))
    scale = commands.add_parser("scale", help="grow or shrink a running job's generator pool")
    scale.add_argument("job_id")
    scale.add_argument("--generators", type=int, required=True, help="engines from the job's next step on")
    connection(scale)


def command_submit(args) -> int:
    """Validate, decide the run directory (rl_service/driver/job_runs.py), submit; prints the run directory
    on stderr and the job id on stdout. The job's metadata `job_name` is the dashboard's Name column."""
    from rl_service.config import load_config
    from rl_service.driver.job_runs import (RUN_DIR_LOG_PREFIX, RUN_DIR_METADATA, check_local_paths,
                                           refuse_paths_leaving, submit_run_dir)
    from rl_service.driver.roles import new_submission_id

    config_path = Path(args.config).resolve()
    config = load_config(config_path, args.overrides)   # fails here, before anything is submitted
    working_dir = Path.cwd().resolve()
    if not config_path.is_relative_to(working_dir):
        raise UserError(f"{args.config}: the config must be inside the working directory ({working_dir}), "
                        "which is what the job receives")
    refuse_paths_leaving(config, working_dir)
    if not args.no_local_check:
        check_local_paths(config, working_dir)
        from rl_service.driver.trainer import prepare_job

        # validate's own checks of data rows and the model directory here, where a failure costs no job:
        # each failed only on the cluster, after the job had started. Not the custom reward's import: it
        # runs in this machine's sandbox (bubblewrap, which a laptop may lack) and may need packages only
        # the cluster's venv has; its file was checked above.
        prepare_job(config.model_copy(update={"reward": config.reward.model_copy(update={"custom": None})}))
    job_id = new_submission_id(config.job_name)
    run_dir = submit_run_dir(args.run_dir, config, job_id, working_dir)
    from rl_service.driver.run_dir import run_entries

    held = run_entries(run_dir)
    if held:   # visible here (one machine, or shared storage): the job would refuse it
        raise UserError(f"--run-dir {run_dir}: already holds a run ({', '.join(held[:3])}); continue "
                        "a submitted run with `rl-service resume JOB_ID`, or choose another --run-dir")
    entrypoint = " ".join(["python", "-m", "rl_service.cli", "run", shlex.quote(str(config_path.relative_to(working_dir))),
                           "--run-dir", shlex.quote(str(run_dir))]
                          + [f"--set {shlex.quote(override)}" for override in args.overrides])
    client = job_server_client(args)
    # Only the files the job needs travel (rl_service/driver/job_upload.py), never the whole directory.
    files = job_files(working_dir, config, config_path)
    with staged_working_dir(working_dir, files) as stage:
        submit_job(args, client, entrypoint=entrypoint, submission_id=job_id,
                   metadata={"job_name": config.job_name, "rl_service_job": config.job_name,
                             RUN_DIR_METADATA: str(run_dir), FILES_METADATA: json.dumps(list(map(str, files)))},
                   runtime_env={"working_dir": str(stage), "excludes": UPLOAD_EXCLUDES,
                                "env_vars": {SUBMISSION_ID_ENV: job_id}})
    print(f"{RUN_DIR_LOG_PREFIX}{run_dir}", file=sys.stderr)
    print(job_id)
    return 0


def command_status(args) -> int:
    """The status on the first line; for a job that did not succeed, Ray's message after it (for a
    failed entrypoint: its exit code and the log's last lines, where our one-line error is)."""
    client = job_server_client(args)
    info = sdk_call(args, lambda: client.get_job_info(args.job_id))
    print(info.status.value)
    if info.status.value in ("FAILED", "STOPPED") and info.message:
        lines = [line for line in info.message.splitlines() if line.strip()]
        shown = lines if len(lines) <= 12 else lines[:1] + ["..."] + lines[-10:]
        print("\n".join(f"  {line}" for line in shown))
        if rl_service_import_failed(info.message):
            print("  the job's `python` cannot import rl_service or its dependencies: start `ray start` on every node "
                  "with the venv that rl_service is installed in first on PATH (deploy/README.md)")
    return 0


def rl_service_import_failed(message: str) -> bool:
    """Whether a failed job's message is the job's python missing rl_service or one of its own
    dependencies (a node started outside the venv), not a user's module (a custom reward's neighbour)."""
    import re

    own = {"rl_service", "actors", "ray", "torch", "transformers", "deepspeed", "vllm", "safetensors", "pydantic",
           "yaml", "numpy", "peft", "datasets", "rich"}
    missing = re.findall(r"No module named '([\w.]+)'", message)
    return any(name.split(".")[0] in own for name in missing)


def command_stop(args) -> int:
    client = job_server_client(args)
    stopped = sdk_call(args, lambda: client.stop_job(args.job_id))
    print(f"{args.job_id}: {'stopping' if stopped else 'not running'}")
    return 0


def command_logs(args) -> int:
    client = job_server_client(args)
    if not args.follow:
        print(sdk_call(args, lambda: client.get_job_logs(args.job_id)), end="")
        return 0
    sdk_call(args, lambda: client.get_job_status(args.job_id))   # an unknown id fails here, in one line

    async def follow() -> None:
        async for chunk in client.tail_job_logs(args.job_id):
            print(chunk, end="", flush=True)

    sdk_call(args, lambda: asyncio.run(follow()))
    # Like `tail --pid` of the job: a script that follows a job learns how it ended from the exit code.
    return 1 if sdk_call(args, lambda: client.get_job_status(args.job_id)).value == "FAILED" else 0


def command_list(args) -> int:
    client = job_server_client(args)
    jobs = sdk_call(args, client.list_jobs)
    from rl_service.driver.job_runs import RUN_DIR_METADATA

    print(f"{'job id':<48} {'status':<10} run directory (or entrypoint)")
    for job in sorted(jobs, key=lambda job: job.start_time or 0):
        # The run directory is what a user looks for; an entrypoint cut at 80 characters hid it.
        where = (job.metadata or {}).get(RUN_DIR_METADATA) or job.entrypoint
        print(f"{(job.submission_id or job.job_id or '?'):<48} {job.status.value:<10} {where}")
    return 0


def command_scale(args) -> int:
    """Writes the request into the cluster's KV store and waits for the job's driver to answer it in
    its log (rl_service/driver/elastic.py `ScaleListener`): no Ray job of its own."""
    from rl_service.driver.elastic import scale_answer, scale_request_key

    if args.generators < 1:
        raise UserError(f"--generators {args.generators}: a job needs at least one generator engine")
    client = job_server_client(args)
    status = sdk_call(args, lambda: client.get_job_status(args.job_id)).value
    if status != "RUNNING":
        raise UserError(f"job {args.job_id} is {status}, not running: nothing to scale")
    request_id = uuid.uuid4().hex[:8]
    _, key = scale_request_key(args.job_id, request_id).split("://", 1)
    # The SDK's own request helper: it carries the token header and the address exactly as the
    # job calls do (the upload endpoint stores the body in the KV under gcs://<key>).
    response = sdk_call(args, lambda: client._do_request("PUT", f"/api/packages/gcs/{key}",
                                                      data=json.dumps({"generators": args.generators}).encode()))
    if response.status_code != 200:
        raise UserError(f"{server_address(args.address)}: the job server refused the scale request "
                        f"(HTTP {response.status_code}): {cause(RuntimeError(response.text))}")
    prefix = scale_answer(request_id, "")
    deadline = time.monotonic() + 300
    while True:
        logs = sdk_call(args, lambda: client.get_job_logs(args.job_id))
        answer = next((line.split(prefix, 1)[1].strip() for line in logs.splitlines() if prefix in line), None)
        if answer is not None:
            break
        status = sdk_call(args, lambda: client.get_job_status(args.job_id)).value
        if status != "RUNNING":
            raise UserError(f"job {args.job_id} ended ({status}) before it answered the scale request")
        if time.monotonic() > deadline:
            raise UserError(f"job {args.job_id}: no answer to the scale request in 300 s (is its driver between steps?)")
        time.sleep(1)
    if answer.startswith("refused: "):
        raise UserError(answer.removeprefix("refused: "))
    print(f"{args.job_id}: {answer}")
    return 0


JOB_COMMANDS = {"submit": command_submit, "status": command_status, "stop": command_stop, "logs": command_logs,
                "list": command_list, "scale": command_scale}
