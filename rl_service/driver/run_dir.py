"""The run directory: resolved config, metrics (JSONL + TensorBoard), checkpoints, summary.

Checkpoints are written under a temporary name, fsynced and renamed into place, so a reader never
sees a half-written `step_N`; `latest` is written last and names the newest complete one. A
checkpoint holds everything a run needs to continue exactly: `model/` (safetensors + tokenizer),
`learner_state.*` (optimizer moments, LR schedule, torch RNG, counters), `statistics.safetensors`,
`trainer_state.json` (data cursor, weight version, totals, eval history, an offline pilot's batches
still to train) and the `config.yaml` it ran with; in async mode also `rollouts_in_flight.json` and
`.safetensors`, the rollouts launched ahead of the step, sampled with older weights (waited for:
small fields and scores as JSON, token ids and log-probs as arrays).
Generators hold no RNG state: every call is seeded from (seed, step).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from rl_service.config import JobConfig, dump_config
from rl_service.models.loading import safetensors_problem


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/Inf; null says "not a number" honestly
    return value


# Every checkpoint holds these, besides its weights (`model/`, or `adapter/` under LoRA).
CHECKPOINT_FILES = ("trainer_state.json", "learner_state.json", "learner_state.safetensors", "statistics.safetensors")
# An async run's checkpoint also holds the rollouts launched ahead of its step: their small fields and
# scores (JSON), and their per-token ids and log-probs (safetensors).
IN_FLIGHT_FILE = "rollouts_in_flight.json"
IN_FLIGHT_ARRAYS = "rollouts_in_flight.safetensors"


def refuse_empty_run_dir(run_dir: str | None) -> None:
    """`--run-dir ""` (an unset shell variable) is not "no --run-dir": the default place it fell back to
    had trained a whole run under runs/."""
    from rl_service.errors import UserError

    if run_dir is not None and not run_dir.strip():
        raise UserError("--run-dir is empty: name the run directory, or leave --run-dir out for "
                        "<logging.output_dir>/<run id>")


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (a file missing or damaged, trainer_state.json not JSON),
    or None. Cheap: safetensors files are checked by their headers, never loaded."""
    missing = [name for name in CHECKPOINT_FILES if not (checkpoint / name).is_file()]
    # The weights as the learner reloads them: a model/ or adapter/ folder without them failed only
    # once Ray and the roles had started, in the learner's traceback.
    if (checkpoint / "adapter").is_dir():
        missing += [f"adapter/{name}" for name in ("adapter_config.json", "adapter_model.safetensors")
                    if not (checkpoint / "adapter" / name).is_file()]
    elif (checkpoint / "model").is_dir():
        missing += ["model/config.json"] if not (checkpoint / "model" / "config.json").is_file() else []
        missing += [] if any((checkpoint / "model").glob("*.safetensors")) else ["model/*.safetensors"]
    else:
        missing.append("model/")
    if missing:
        return f"no {', '.join(missing)}"
    try:   # not JSON (cut short, overwritten), or no step
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return "trainer_state.json is not readable"
    lacking = [name for name in (IN_FLIGHT_FILE, IN_FLIGHT_ARRAYS) if not (checkpoint / name).is_file()]
    if state.get("in_flight_steps") and lacking:
        return f"no {', '.join(lacking)}"
    # Every array file it holds (weights in model/ or adapter/, learner state, statistics, rollouts in
    # flight): any one cut short fails the resume, so each is checked.
    for path in sorted(checkpoint.rglob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem is not None:
            return f"{path.relative_to(checkpoint)} is damaged: {problem}"
    return None


def step_checkpoints(run_dir: Path) -> list[Path]:
    """`checkpoints/step_N` directories, newest first. One being written when the run was killed is
    still `.tmp_step_N`: never among them."""
    found = [path for path in (run_dir / "checkpoints").glob("step_*")
             if path.is_dir() and path.name.removeprefix("step_").isdigit()]
    return sorted(found, key=lambda path: int(path.name.removeprefix("step_")), reverse=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete `checkpoints/step_N` of a run directory, or None before the first. A newer
    one deleted or damaged (a user rolling a diverged step back) is passed over; one renamed into
    place by a run killed before it updated `checkpoints/latest` is complete, and taken."""
    return next((path for path in step_checkpoints(Path(run_dir)) if checkpoint_problem(path) is None), None)


def resumable_checkpoint(run_dir: Path, config: JobConfig) -> Path:
    """The checkpoint `rl-service resume` continues from; a UserError when there is none, when the
    run already trained `config.steps` (resuming would train nothing and rewrite its summary), or
    when the checkpoint's weights are not what `config` trains (LoRA turned on or off)."""
    from rl_service.errors import UserError

    run_dir = Path(run_dir)
    checkpoint, damaged = None, []   # the newest complete one; the damaged ones newer than it
    for path in step_checkpoints(run_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            checkpoint = path
            break
        damaged.append(f"{path.name} ({problem})")
    if checkpoint is None:
        if damaged:   # --overwrite would delete them: not the advice to give
            raise UserError(f"{run_dir}: no complete checkpoint to resume from: {'; '.join(damaged)}")
        raise UserError(f"{run_dir}: no checkpoint to resume from; start it again with "
                        f"`rl-service run {run_dir / 'config.yaml'} --run-dir {run_dir} --overwrite`")
    if damaged:
        logging.getLogger("rl_service").warning("%s: resuming from %s; newer checkpoints cannot be: %s", run_dir,
                                                checkpoint.name, "; ".join(damaged))
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    done = state["step"]
    if config.steps <= done:
        raise UserError(f"{run_dir}: already trained {done} steps and its config says steps: {config.steps}; "
                        f"to train more, `rl-service resume {run_dir} --set steps=N` with N > {done}")
    # Async mode: rollouts sampled ahead of the checkpoint, with older weights, go back in flight; a
    # smaller staleness bound (or sync mode) would refuse them at the first step, after Ray started.
    in_flight = state.get("in_flight_steps") or []
    bound = config.schedule.max_staleness if config.schedule.mode == "async" else 0
    if len(in_flight) > bound:
        raise UserError(f"schedule: {checkpoint} holds the rollouts of steps {in_flight}, sampled ahead with older "
                        f"weights (async mode); resume with schedule.mode: async and schedule.max_staleness >= "
                        f"{len(in_flight)}, as the run began")
    has_adapter = (checkpoint / "adapter").is_dir()
    if has_adapter != (config.learner.lora is not None):
        held = "a LoRA adapter (adapter/)" if has_adapter else "full weights, no LoRA adapter"
        raise UserError(f"learner.lora: {checkpoint} holds {held}, and LoRA cannot be turned "
                        f"{'off' if has_adapter else 'on'} when resuming; resume with learner.lora as the run began "
                        "(a new run can start from the checkpoint's model/ with model.path)")
    return checkpoint


def check_checkpoint_prompts(checkpoint: Path, train_prompt_ids) -> None:
    """The prompts a checkpoint holds batches of (an offline-pilot chunk still to train, rollouts in
    flight) are in the train split: a train file changed since (a prompt removed, ids renumbered)
    failed with a KeyError once Ray and the roles had started."""
    from rl_service.errors import UserError

    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    held = [prompt_id for entry in (state.get("batch_source") or {}).get("queue", []) for prompt_id in entry["prompt_ids"]]
    if state.get("in_flight_steps"):
        in_flight = json.loads((checkpoint / IN_FLIGHT_FILE).read_text(encoding="utf-8"))
        held += [prompt_id for entry in in_flight for prompt_id in entry["prompt_ids"]]
    missing = sorted(set(held) - set(train_prompt_ids))
    if missing:
        raise UserError(f"{checkpoint}: holds batches of prompts the train split no longer has (ids "
                        f"{', '.join(map(str, missing[:5]))}{' ...' if len(missing) > 5 else ''}): resume with the "
                        "data the run began with")


# What a run writes into its directory (`--overwrite` removes these and nothing else).
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "ledger.jsonl", "summary.json", "checkpoints", "tb", "report",
               "wandb", "tracker_runs.json", "driver.log")
_KERNEL_FILE_SYSTEMS = ("/proc", "/sys", "/dev")


def _started_nothing(directory: Path) -> bool:
    """A run that failed before its first metrics row (Ray or a role could not start): no checkpoint,
    no summary, no row. Reusing its directory loses nothing, and refusing it left the user with a
    directory they could neither resume nor run again without --overwrite."""
    metrics = directory / "metrics.jsonl"
    return (not step_checkpoints(directory) and not (directory / "summary.json").exists()
            and (not metrics.exists() or metrics.stat().st_size == 0))


LOCK_FILE = ".rl_service_lock"


def lock_run_dir(directory: Path) -> int:
    """Hold `directory` for this process's run: a second `run` or `resume` of it (two jobs resuming one
    run, 2 s apart, both trained the same steps into one ledger) is refused while this one lives. An
    flock, so the kernel releases it when the process ends, killed or not. Returns the descriptor to
    keep open; a UserError names the holder."""
    import fcntl
    import socket

    from rl_service.errors import UserError

    path = Path(directory) / LOCK_FILE
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = path.read_text(encoding="utf-8", errors="replace").strip() or "another process"
        os.close(descriptor)
        raise UserError(f"{directory}: in use by another run or resume of it ({holder}); wait for it to end, or "
                        "stop it (`rl-service stop JOB_ID` for a submitted job)") from None
    except OSError as error:   # a file system without locks (some NFS or FUSE mounts): run unguarded
        import logging

        logging.getLogger("rl_service").warning("%s: cannot lock the run directory (%s): nothing stops a second "
                                                "run or resume of it", directory, error.strerror or error)
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    return descriptor


def run_entries(directory: Path) -> list[str]:
    """What of a run `directory` holds (`RUN_ENTRIES`), [] when it holds none or only a run that started nothing."""
    directory = Path(directory)
    existing = [name for name in RUN_ENTRIES if (directory / name).exists()]
    return [] if not existing or _started_nothing(directory) else existing


def prepare_run_dir(path: str | Path, resume: bool = False, overwrite: bool = False, clear: bool = True,
                    named: str | None = None) -> None:
    """Check (and create) a run directory before Ray starts; a UserError names the problem.

    A directory that already holds a run is continued only with `resume` (from its checkpoint),
    replaced only with `overwrite`; without either the run is refused, since appending to it
    mixed two runs' metrics and ledgers (steps 1, 2, 1, 2) and overwrote their checkpoints.
    `resume` on a run that never checkpointed starts it over: nothing of it can be continued.
    `clear=False` checks only (call it again with True once the job's inputs are known good). `named`:
    how errors name the directory (default `--run-dir PATH`; a default one came from logging.output_dir)."""
    from rl_service.errors import UserError

    named = named or f"--run-dir {path}"
    directory = Path(path).expanduser().absolute()
    under = lambda top: directory == Path(top) or Path(top) in directory.parents   # noqa: E731
    # /dev/shm is an ordinary tmpfs (memory-backed, gone at reboot), not a kernel interface.
    if any(under(top) for top in _KERNEL_FILE_SYSTEMS) and not under("/dev/shm"):
        raise UserError(f"{named}: under {next(t for t in _KERNEL_FILE_SYSTEMS if str(directory).startswith(t))}, "
                        "a kernel file system, not a place for results")
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{named}: exists and is not a directory")
    existing = [name for name in RUN_ENTRIES if (directory / name).exists()]
    if not overwrite and not resume and run_entries(directory):
        raise UserError(f"{named}: already holds a run ({', '.join(existing[:3])}); continue it with "
                        f"`rl-service resume {path}` (or run --resume), or replace it with --overwrite")
    # Cleared with --overwrite, or (a resume of a run that never checkpointed) when no checkpoint of any
    # kind is there: one judged incomplete is the user's to look at, never deleted unasked.
    if clear and existing and (overwrite or not step_checkpoints(directory)):
        for name in existing:
            entry = directory / name
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".rl_service_write_check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{named}: cannot write there ({exc.strerror or exc})") from None


class RunDirectory:
    def __init__(self, path: str | Path, config: JobConfig, resume_step: int | None = None):
        """Open a run directory; `resume_step`: continue a run from its checkpoint of that step,
        dropping the metrics rows a killed run logged after it (they are about to be redone)."""
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.keep_last = config.checkpoint.keep_last
        self.config_text = dump_config(config)
        if resume_step is None:
            self.write_config()
        # A resume writes its config (with its --set overrides) once its checkpoint is restored
        # (`write_config`): one that failed to start had left config.yaml holding what broke it.
        if resume_step is not None:
            for name in ("metrics.jsonl", "ledger.jsonl"):
                self._truncate(self.path / name, resume_step)
        self._metrics = open(self.path / "metrics.jsonl", "a", encoding="utf-8")
        self._ledger = open(self.path / "ledger.jsonl", "a", encoding="utf-8")
        self._tensorboard = None
        if config.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # A resume replays the steps after its checkpoint: TensorBoard drops the events logged at
            # or after purge_step, as metrics.jsonl drops those rows (a restart with none, -1: all).
            self._tensorboard = SummaryWriter(log_dir=str(self.path / "tb"),
                                              purge_step=resume_step + 1 if resume_step is not None else None)
        from rl_service.trackers import open_trackers   # W&B / MLflow when configured; imports neither otherwise

        self._trackers = open_trackers(config, self.path, resume=resume_step is not None)

    def write_config(self) -> None:
        (self.path / "config.yaml").write_text(self.config_text, encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{key: _jsonable(value) for key, value in metrics.items()}}
        self._metrics.write(json.dumps(row, sort_keys=True) + "\n")
        self._metrics.flush()
        if self._tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tensorboard.add_scalar(key, value, step)
        self._trackers.log(step, row)

    def log_ledger(self, step: int, prompt_ids: list[int], samples: list[int]) -> None:
        """What a step trained on: its prompts and each one's sample count. A resumed or replayed run
        drops the rows after its checkpoint, so the ledger holds every trained step exactly once."""
        self._ledger.write(json.dumps({"step": step, "prompt_ids": prompt_ids, "samples": samples}) + "\n")
        self._ledger.flush()

    def initial_evaluation(self) -> dict:
        """The step-0 evaluation this run logged (every eval_* figure: both reasoning modes of a BVPO
        job, each eval group), for the summary of a resumed run; {} if there is none."""
        path = self.path / "metrics.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("step") == 0 and "eval_accuracy" in row:
                return {key: value for key, value in row.items() if key.startswith("eval_")}
        return {}

    @staticmethod
    def _truncate(rows_file: Path, last_step: int) -> None:
        if not rows_file.is_file():
            return
        kept = [line for line in rows_file.read_text(encoding="utf-8").splitlines()
                if line.strip() and _row_step(line) <= last_step]
        staging = rows_file.with_suffix(".jsonl.tmp")
        staging.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(staging, rows_file)

    def write_checkpoint(self, step: int, save_learner: Callable[[str], None], statistics: dict[str, np.ndarray],
                         trainer_state: dict) -> Path:
        """`save_learner(directory)` writes the learner's part (`model/`, optimizer state) into the
        staging directory; the rest is written here."""
        from safetensors.numpy import save_file

        checkpoints = self.path / "checkpoints"
        checkpoints.mkdir(exist_ok=True)
        final = checkpoints / f"step_{step}"
        staging = checkpoints / f".tmp_step_{step}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        save_learner(str(staging))
        save_file({key: np.ascontiguousarray(value) for key, value in statistics.items()},
                  str(staging / "statistics.safetensors"))
        (staging / "config.yaml").write_text(self.config_text, encoding="utf-8")
        (staging / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2, sort_keys=True), encoding="utf-8")
        _fsync_tree(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        latest_tmp = checkpoints / ".latest.tmp"
        latest_tmp.write_text(final.name, encoding="utf-8")
        os.replace(latest_tmp, checkpoints / "latest")
        if self.keep_last is not None:
            complete = sorted((path for path in checkpoints.glob("step_*") if path.is_dir()),
                              key=lambda path: int(path.name.removeprefix("step_")))
            for old in complete[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.path)

    def write_summary(self, summary: dict) -> Path:
        target = self.path / "summary.json"
        target.write_text(json.dumps({k: _jsonable(v) for k, v in summary.items()}, indent=2, sort_keys=True),
                          encoding="utf-8")
        return target

    def close(self) -> None:
        self._metrics.close()
        self._ledger.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        self._trackers.close()


def _row_step(line: str) -> float:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf   # the torn last line of a killed run: dropped


def _fsync_tree(directory: Path) -> None:
    for file in directory.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
