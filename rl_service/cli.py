"""`rl-service`: the command line.

    rl-service run CONFIG [--set a.b=c ...] [--run-dir DIR [--resume]]
                                                                train (local Ray on 127.0.0.1, or RAY_ADDRESS)
    rl-service resume RUN_DIR|JOB_ID [--set a.b=c ...]          continue a stopped or killed run from its last checkpoint
                                                                (a job id: as a new job on the job's cluster)
    rl-service eval MODEL|CHECKPOINT|RUN_DIR [CONFIG] [--set ...]  greedy eval accuracy of a model directory
    rl-service config-schema                                    the JobConfig JSON schema
    rl-service validate CONFIG [--set ...]                      check a config and its data, start nothing
    rl-service report RUN_DIR|JOB_ID [--out DIR]                PNG plots of a run's metrics.jsonl (default RUN_DIR/report)

A user's mistake (config, dataset, model directory) prints one line naming what is wrong and exits
with code 2, before Ray starts; no traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import shutil
import sys
from pathlib import Path

from rl_service.errors import UserError
from rl_service.driver.jobs import JOB_COMMANDS, add_job_commands, connection
from rl_service.driver.stop_signal import StopRequested

EXIT_USER_ERROR = 2
EXIT_GUARD_STOP = 3   # a guard stopped the run early (summary.json's stopped_reason says which)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rl-service", description="Ray-based RL training for reasoning models")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="train a job from a YAML config")
    run.add_argument("config", help="YAML job file (see configs/)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. --set learner.lr=1e-5 (repeatable)")
    run.add_argument("--run-dir", help="output directory (default: <logging.output_dir>/<job_name>-<time>-<id>)")
    run.add_argument("--resume", action="store_true",
                     help="continue from --run-dir's latest checkpoint if it has one (else start there)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run already in --run-dir (without this or --resume such a run is refused)")

    resume = commands.add_parser("resume", help="continue a stopped or killed run from its latest checkpoint")
    resume.add_argument("run_dir", help="the run directory (holds config.yaml and checkpoints/), or the id of a "
                                        "submitted job: resumed as a new job on its cluster (prints the new id)")
    resume.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a field for the rest of the run, e.g. --set steps=200")

    validate = commands.add_parser("validate", help="validate a config and load its data and tokenizer")
    validate.add_argument("config", help="YAML job file (see configs/)")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a config field, as run takes it (repeatable)")

    evaluate = commands.add_parser("eval", help="greedy accuracy of a model directory on a job's eval split")
    evaluate.add_argument("checkpoint", help="model directory, 'builtin', or a run directory / RUN_DIR/checkpoints/step_N "
                                             "/ RUN_DIR/checkpoints/latest (their checkpoint's model/; a LoRA checkpoint without model/: "
                                             "its adapter/ merged into the base model its config.yaml names)")
    evaluate.add_argument("config", nargs="?", help="YAML job file whose eval split to use (default: built-in task)")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a field of that config, e.g. --set eval.samples=8 (repeatable)")

    commands.add_parser("config-schema", help="print the JobConfig JSON schema")

    report = commands.add_parser("report", help="PNG plots of a run's metrics.jsonl (reward, accuracy, throughput, ...)")
    report.add_argument("run_dir", help="the run directory (holds metrics.jsonl), or a submitted job's id")
    report.add_argument("--out", help="directory for the PNGs (default: RUN_DIR/report)")
    connection(resume)   # used only with a job id
    connection(report)
    add_job_commands(commands)
    return parser


def _run_id(config) -> str:
    """One id per run (a submitted job's is its submission id), shared by its default run directory,
    actor names and metric tags (rl_service/driver/roles.py)."""
    from rl_service.driver.roles import SUBMISSION_ID_ENV, new_submission_id

    return os.environ.setdefault(SUBMISSION_ID_ENV, new_submission_id(config.job_name))


def _default_run_dir(config) -> Path:
    run_dir = Path(config.logging.output_dir) / _run_id(config)
    if not run_dir.is_absolute() and config.cluster.address_to_join():
        logging.getLogger("rl_service").warning(
            "run directory %s is inside the job's working directory, which Ray deletes: pass --run-dir or set "
            "logging.output_dir to an absolute path (rl-service submit does)", run_dir.resolve())
    return run_dir


def _announce(run_dir: Path) -> None:
    """The run directory, absolute, on stdout once the checks made before Ray starts have passed (said
    before a refusal, it named a directory never used) and before training: the first line of a job's
    log (`rl-service report JOB_ID` reads it from there for a job submitted without our CLI)."""
    from rl_service.driver.job_runs import RUN_DIR_LOG_PREFIX

    print(f"{RUN_DIR_LOG_PREFIX}{run_dir.resolve()}", flush=True)


_HELD_LOCKS: list[int] = []   # the run directory this command runs (`run_dir.lock_run_dir`): released when it ends
_RUNNING: list[Path] = []     # that run directory, for the line Ctrl-C prints


def run_exit_code(summary: dict) -> int:
    """0 for a run that trained its steps; EXIT_GUARD_STOP when a guard stopped it (non-finite updates,
    an eval collapse, a reward failing on every sample), so a script or a Ray job sees it failed."""
    return 0 if summary.get("stopped_reason") == "completed" else EXIT_GUARD_STOP


def _command_run(args) -> int:
    from rl_service.config import load_config
    from rl_service.driver.run_dir import lock_run_dir, prepare_run_dir, refuse_empty_run_dir

    refuse_empty_run_dir(args.run_dir)
    if args.resume and not args.run_dir:
        raise UserError("run --resume needs --run-dir: the run directory to continue")
    config = load_config(args.config, args.overrides)
    _run_id(config)
    run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir(config)
    # Errors name what the user set: a default directory comes from logging.output_dir, not --run-dir.
    named = (f"--run-dir {args.run_dir}" if args.run_dir
             else f"logging.output_dir {config.logging.output_dir} (run directory {run_dir})")
    try:
        created = not run_dir.exists()
    except OSError as exc:   # a directory above it that cannot be entered
        raise UserError(f"{named}: cannot look there ({exc.strerror or exc})") from None
    # a file, /proc, an existing run
    prepare_run_dir(run_dir, args.resume, args.overwrite, clear=False, named=named)
    _HELD_LOCKS.append(lock_run_dir(run_dir))   # one run or resume of a directory at a time
    _RUNNING.append(run_dir)
    try:
        return _run_in(run_dir, config, args, named)
    except (UserError, KeyboardInterrupt):
        if created:   # refused before anything ran: no directory holding only a lock file is left behind
            _remove_if_empty(run_dir)
        raise


def _remove_if_empty(run_dir: Path) -> None:
    from rl_service.driver.run_dir import LOCK_FILE

    if run_dir.is_dir() and all(entry.name == LOCK_FILE for entry in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def _run_in(run_dir: Path, config, args, named: str) -> int:
    from rl_service.config import load_config
    from rl_service.driver.trainer import prepare_job, run_training
    from rl_service.progress import print_summary

    from rl_service.driver.preflight import check_cluster
    from rl_service.driver.run_dir import prepare_run_dir, step_checkpoints

    if args.resume:
        # Any checkpoint: continue from it, or say why none can be. Starting over here deleted the run.
        if step_checkpoints(run_dir):
            saved = Path(args.run_dir) / "config.yaml"
            # Compared as configs, not text: a newer rl-service may write the same config in another order.
            changed = config_differences(load_config(saved).model_dump(), config.model_dump())
            if changed:
                shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
                raise UserError(f"{args.config}: differs from {saved}, the config the run started with ({shown}); "
                                f"continue it with `rl-service resume {args.run_dir} [--set KEY=VALUE]` to change a field")
            return _resume(Path(args.run_dir), config)
    job = prepare_job(config)  # user-input errors surface here, before Ray starts
    check_cluster(config)      # a cluster that does not answer, roles a local Ray cannot place
    # only now: replacing a run, once the new one can start
    prepare_run_dir(run_dir, args.resume, args.overwrite, named=named)
    _announce(run_dir)
    summary = run_training(job, run_dir)
    print_summary(summary, str(run_dir.resolve()))
    return run_exit_code(summary)


def config_differences(saved: dict, given: dict, prefix: str = "") -> list[str]:
    """The fields (dotted paths) whose values differ between two dumped configs, each with both values:
    "differs" alone left the user to diff two YAML files by hand."""
    differences = []
    for key in [*saved, *(key for key in given if key not in saved)]:   # in the config's own order
        path, old, new = f"{prefix}{key}", saved.get(key), given.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differences += config_differences(old, new, f"{path}.")
        elif old != new:
            differences.append(f"{path}: the run has {old!r}, given {new!r}")
    return differences


def _command_resume(args) -> int:
    from rl_service.config import load_config
    from rl_service.driver.job_runs import as_job_id, is_job_id, resume_job

    if not args.run_dir.strip():   # Path("") is the working directory
        raise UserError("the run directory is empty: name a run directory or a job id")
    if is_job_id(args.run_dir):
        return as_job_id(args.run_dir, lambda: resume_job(args))
    run_dir = Path(args.run_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    from rl_service.driver.run_dir import lock_run_dir

    _HELD_LOCKS.append(lock_run_dir(run_dir))
    _RUNNING.append(run_dir)
    return _resume(run_dir, load_config(saved, args.overrides))


def _resume(run_dir: Path, config) -> int:
    from rl_service.driver.trainer import prepare_job, run_training
    from rl_service.progress import print_summary
    from rl_service.driver.preflight import check_cluster
    from rl_service.driver.run_dir import check_checkpoint_prompts, resumable_checkpoint

    checkpoint = resumable_checkpoint(run_dir, config)
    _run_id(config)
    job = prepare_job(config)
    if not config.algorithm.is_preference:
        check_checkpoint_prompts(checkpoint, [record.prompt_id for record in job.task.train])
    check_cluster(config)
    _announce(run_dir)
    logging.getLogger("rl_service").info("resuming %s from %s", run_dir, checkpoint.name)
    summary = run_training(job, run_dir, resume_from=checkpoint)
    print_summary(summary, str(run_dir.resolve()))
    return run_exit_code(summary)


def _command_validate(args) -> int:
    from rl_service.config import load_config
    from rl_service.driver.trainer import prepare_job

    from rl_service.driver.preflight import local_run_problem

    config = load_config(args.config, args.overrides)
    job = prepare_job(config)
    print(f"{args.config}: ok ({len(job.task.train)} train prompts, {len(job.task.eval)} eval prompts, "
          f"verifier {job.task.verifier})")
    # The config is valid; this machine is another matter. A local `run` of it here would be refused:
    # say so now (a config meant for a cluster is submitted there, where this does not apply).
    problem = local_run_problem(config)
    if problem:
        print(f"{args.config}: note: `rl-service run` here would be refused: {problem}", file=sys.stderr)
    return 0


def _command_eval(args) -> int:
    from rl_service.config import load_config
    from rl_service.driver.evaluation import evaluate_model_dir

    model_dir, adapter = _model_to_evaluate(args.checkpoint)
    if model_dir != args.checkpoint:   # stdout stays the metrics' JSON
        shown = f"{adapter} merged into its base {model_dir}" if adapter else model_dir
        print(f"rl-service eval: evaluating {shown}", file=sys.stderr, flush=True)
    config = load_config(args.config, args.overrides + [f"model.path={model_dir}"])
    metrics = evaluate_model_dir(config, adapter)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


def _model_to_evaluate(given: str) -> tuple[str, Path | None]:
    """The model directory `eval` loads for what the user named, and the LoRA adapter to merge into
    it: a run directory (its newest complete checkpoint), a checkpoint `step_N` and
    `checkpoints/latest` (the step it names) stand for their model/. Each had failed with
    "model.path: ... has no config.json", a field the user never set. A LoRA checkpoint saved without
    model/ (learner.lora.save_merged: false) is its adapter/ over the base its config.yaml trained."""
    from rl_service.driver.run_dir import latest_checkpoint

    path = Path(given).expanduser()
    try:
        if path.name == "latest" and path.parent.name == "checkpoints" and path.is_file():
            step = path.read_text(encoding="utf-8").strip()
            if not step.startswith("step_") or not (path.parent / step).is_dir():
                raise UserError(f"{given}: names {step or 'no checkpoint'}, which is not there; pass the run "
                                f"directory {path.parent.parent} to evaluate its newest complete checkpoint")
            path = path.parent / step
        elif not (path / "config.json").exists() and (path / "checkpoints").is_dir():   # a run directory
            checkpoint = latest_checkpoint(path)
            if checkpoint is None:
                raise UserError(f"{given}: a run directory with no complete checkpoint to evaluate")
            path = checkpoint
        if not (path / "config.json").exists() and (path / "model").is_dir():   # a checkpoint
            return str(path / "model"), None
        if (path / "adapter_config.json").is_file() and (path.parent / "config.yaml").is_file():   # step_N/adapter
            path = path.parent
        if not (path / "config.json").exists() and (path / "adapter").is_dir():
            return _adapter_base(path), path / "adapter"
    except OSError:   # unreadable: the model loader's check names it
        return given, None
    return (given if path == Path(given).expanduser() else str(path)), None   # else the model loader explains


def _adapter_base(checkpoint: Path) -> str:
    """The base model a LoRA checkpoint's adapter was trained on: model.path of its config.yaml."""
    import yaml

    saved = checkpoint / "config.yaml"
    if not saved.is_file():
        raise UserError(f"{checkpoint}: holds a LoRA adapter (adapter/) but no config.yaml naming its base model")
    # Only model.path is read: the rest of the run's config (its data files, its reward) need not exist here.
    model = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("model") or {}
    return str(model.get("path", "builtin"))


def _command_report(args) -> int:
    from rl_service.driver.job_runs import as_job_id, is_job_id, report_job
    from rl_service.report import write_report

    run_dir = as_job_id(args.run_dir, lambda: report_job(args)) if is_job_id(args.run_dir) else args.run_dir
    result = write_report(run_dir, args.out)
    for notice in result.notices:   # skipped plots: on stderr, so stdout lists only the written files
        print(f"rl-service report: {notice}", file=sys.stderr)
    for path in result.written:
        print(path)
    return 0


def _command_config_schema(_args) -> int:
    from rl_service.config import JobConfig

    print(json.dumps(JobConfig.model_json_schema(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    if not _has_cuda_hint():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    handlers = {"run": _command_run, "resume": _command_resume, "validate": _command_validate, "eval": _command_eval,
                "config-schema": _command_config_schema, "report": _command_report, **JOB_COMMANDS}
    try:
        return handlers[args.command](args)
    except UserError as error:
        # One line, always: a message that quotes a library's multi-line exception is joined up.
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"rl-service: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        from rl_service.driver.stop_signal import resume_hint

        print("rl-service: interrupted" + (f"; {resume_hint(_RUNNING[-1])}" if _RUNNING else ""), file=sys.stderr)
        return 130
    except StopRequested:   # its line was printed when the signal came
        return 128 + signal.SIGTERM
    except BrokenPipeError:
        if not _stdout_reader_gone():   # another pipe or socket (an actor's, say): a real error
            raise
        # `rl-service list | head -1`: the reader is gone. Exit as a process killed by SIGPIPE does, without a
        # traceback, and keep Python's flush at exit from failing on the closed pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except Exception:
        from rl_service.driver.stop_signal import stop_requested

        if stop_requested() is not None:   # the stop, turned into another error inside Ray's C++ code
            return 128 + signal.SIGTERM
        raise
    finally:
        while _HELD_LOCKS:
            os.close(_HELD_LOCKS.pop())


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on its write end)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):   # no real file behind stdout (a test's capture)
        return False


def _has_cuda_hint() -> bool:
    # Decided without importing torch (slow): a CUDA host announces itself through these.
    return bool(os.environ.get("CUDA_VISIBLE_DEVICES")) or Path("/dev/nvidiactl").exists()


if __name__ == "__main__":
    sys.exit(main())
