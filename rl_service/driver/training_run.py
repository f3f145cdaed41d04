"""One run of a job, the same skeleton for RL (GRPO / RAFT++) and preference (DPO / BVPO) jobs: the
prepared inputs, what both trainers share, and the attempts of a run (DESIGN.md "Faults").

    state   = the checkpoint's trainer_state.json (resume, or a restart after a role died)
    roles   = start_roles(config, resume_from)        # generators, rewards, learner (+ statistics)
    trainer = Trainer(job, roles, run_dir)            # or PreferenceTrainer: how a batch meets the learner
    trainer.begin(resume_from, state)
    result  = run_steps(config, trainer, start_step)  # rl_service/driver/step_loop.py: evaluate, step, checkpoint
    summary = trainer.summary(result, lost_s)

When a role's process dies, every role is restarted from the newest checkpoint and the steps after
it are replayed, up to `cluster.max_role_failures` times (`run_with_restarts`, rl_service/driver/roles.py).
"""
from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from rl_service.config import JobConfig
from rl_service.guard import eval_collapsed
from rl_service.progress import run_dir_log
from rl_service.driver.roles import Roles, ray_session, run_with_restarts, start_roles
from rl_service.rollout import SamplingParams
from rl_service.driver.run_dir import RunDirectory
from rl_service.driver.stop_signal import StopRequested
from rl_service.driver.step_loop import LoopResult, run_steps
from rl_service.tasks import TaskData


@dataclass
class PreparedJob:
    """A job's inputs, checked before Ray starts (`driver.prepare_job`)."""
    config: JobConfig
    task: TaskData          # preference offline: `train` lists the dataset's prompts (ids = pair ids)
    tokenizer: object
    dataset: object = None  # preference offline: the PreferenceDataset of pairs


class TrainerBase:
    """What both trainers hold and do alike: the roles, sampling settings, the eval history and
    collapse guard, the live metrics, the loop clock (training time over a run's attempts) and the
    summary fields both job kinds report. A trainer keeps `totals` with `completions` and
    `completion_tokens` over the run, and adds each step's phase times with `add_phase_times`."""

    eval_completions_per_prompt = 1   # greedy eval completions per eval prompt (preference: 2 modes)

    def __init__(self, job: PreparedJob, roles: Roles, run_dir: RunDirectory):
        self.config, self.task, self.roles, self.run_dir = job.config, job.task, roles, run_dir
        generator = self.config.generator
        self.sampling = SamplingParams(generator.temperature, generator.top_p, generator.max_new_tokens)
        self.weight_version = 0   # the version the generators serve
        self.eval_history: list[tuple[int, float]] = []
        # Training wall time of the run before this attempt (from the checkpoint it resumed), and this
        # attempt's loop clock (started by its first step): throughput is over the whole run.
        self.wall_before_s, self.loop_started, self.loop_s_at_checkpoint = 0.0, None, 0.0
        from rl_service.driver.step_metrics import PHASES
        from rl_service.telemetry import StepTelemetry

        self.totals: dict = {"completions": 0, "completion_tokens": 0}   # over the run (restored on resume)
        self.phase_totals = {name: 0.0 for name in PHASES}   # this attempt's seconds per phase: time_share_*

        self.telemetry = StepTelemetry(self.config.job_name)   # live metrics for Ray's dashboard / Prometheus

    def start_step_clock(self) -> float:
        started = time.perf_counter()
        self.loop_started = self.loop_started or started
        return started

    def loop_seconds(self) -> float:
        """Wall seconds since this attempt's first step."""
        return time.perf_counter() - self.loop_started if self.loop_started is not None else 0.0

    def train_wall_s(self) -> float:
        """Training time of the run up to now: before this attempt, and this attempt's loop."""
        self.loop_s_at_checkpoint = self.loop_seconds()
        return self.wall_before_s + self.loop_s_at_checkpoint

    def add_phase_times(self, metrics: dict) -> None:
        """A step's `time_<phase>_s` into the run summary's time shares (every phase, 0 if not timed)."""
        for name in self.phase_totals:
            self.phase_totals[name] += metrics.get(f"time_{name}_s", 0.0)

    def summary(self, result: LoopResult, lost_s: float = 0.0) -> dict:
        """The summary.json fields every job reports (README's run-directory table), RL and preference
        jobs alike. Throughput is over the whole run: every completion of its trained steps over the
        training wall time summed over its attempts (before the checkpoint it resumed, replays after a
        role's death, this attempt), not over this attempt's time alone. The time a SIGKILLed process
        spent after its newest checkpoint is not known to a later `resume`, and is not counted."""
        from rl_service.driver.step_loop import loop_outcome

        completions, tokens = self.totals.get("completions", 0), self.totals.get("completion_tokens", 0)
        train_wall_s = self.wall_before_s + lost_s + result.train_wall_s
        phase_total = sum(self.phase_totals.values()) or 1.0
        return {
            "steps": result.steps,
            "completions": int(completions),
            "completion_tokens": int(tokens),
            "train_wall_s": train_wall_s,
            "train_wall_s_this_attempt": result.train_wall_s,
            "completions_per_s": completions / train_wall_s if train_wall_s > 0 else 0.0,
            "tokens_per_s": tokens / train_wall_s if train_wall_s > 0 else 0.0,
            **loop_outcome(self, result),
            **{f"time_share_{name}": seconds / phase_total for name, seconds in self.phase_totals.items()},
        }

    def collapsed(self) -> bool:
        """The collapse guard: eval accuracy fell `guard.max_eval_drop` below the best seen."""
        return eval_collapsed([accuracy for _, accuracy in self.eval_history], self.config.guard.max_eval_drop,
                              self.eval_completions_per_prompt * len(self.task.eval))

    def restore_common(self, state: dict) -> None:
        """The trainer state both kinds checkpoint: eval history and the run's training time so far."""
        self.eval_history = [tuple(entry) for entry in state["eval_history"]]
        self.wall_before_s = float(state["totals"].get("train_wall_s", 0.0))   # absent in older checkpoints


LOG_FILE = "driver.log"   # in the run directory: the driver's log lines, every attempt appended


@contextmanager
def log_to_run_dir(run_dir_path: str | Path):
    """The driver's log lines (steps, evaluations, warnings, the stop reason) also in RUN_DIR/driver.log:
    a run started with its output to a pipe, or a Ray job whose log is gone with its cluster, leaves its
    log beside its metrics. The roles' own lines stay in Ray's logs (the job's log, `ray logs`)."""
    path = Path(run_dir_path) / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger("rl_service"), run_dir_log]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()


def run_job(job: PreparedJob, run_dir_path: str | Path, resume_from: Path | None, trainer_class) -> dict:
    """Run the whole job with `trainer_class`; returns the summary (also RUN_DIR/summary.json)."""
    attempts: dict = {"lost_s": 0.0}   # training time of failed attempts after their newest checkpoint

    def count_lost_time() -> None:   # replayed from the checkpoint: the time after it was spent, and is counted
        failed = attempts.pop("trainer", None)
        if failed is not None:
            attempts["lost_s"] += failed.loop_seconds() - failed.loop_s_at_checkpoint

    def attempt(resume: Path | None, restart: bool, failures: int) -> dict:
        config = job.config
        state = json.loads((resume / "trainer_state.json").read_text(encoding="utf-8")) if resume else None
        # A restart with no checkpoint yet starts over: the rows of the failed attempt go.
        run_dir = RunDirectory(Path(run_dir_path), config, resume_step=state["step"] if state else (-1 if restart else None))
        start = partial(start_roles, resume_from=str(resume) if resume else None)
        try:
            with ray_session(config, start, job.task.verifier, run_dir=Path(run_dir_path)) as roles:
                trainer = attempts["trainer"] = trainer_class(job, roles, run_dir)
                trainer.begin(resume, state)
                run_dir.write_config()   # only now, for a resume: its overrides work with the checkpoint
                result: LoopResult = run_steps(config, trainer, start_step=state["step"] if state else 0)
                summary = {**trainer.summary(result, attempts["lost_s"]), "role_failures_recovered": failures}
                run_dir.write_summary(summary)
                return summary
        finally:
            run_dir.close()

    with log_to_run_dir(run_dir_path):
        try:
            summary = run_with_restarts(job.config, run_dir_path, resume_from, attempt, on_failure=count_lost_time)
        except StopRequested:   # its line is in the log already
            raise
        except BaseException as error:
            run_dir_log.error("run failed: %s", " ".join(str(error).split()) or type(error).__name__)
            raise
        run_dir_log.info("run ended after step %s: %s; final eval accuracy %s; final checkpoint %s", summary["steps"],
                         summary["stopped_reason"], summary.get("final_eval_accuracy"), summary.get("final_checkpoint"))
        return summary
