"""The outer loop every job shares (RL and preference jobs alike): evaluate, train step by step with
a progress bar, evaluate every `eval_every` steps, checkpoint every `checkpoint.every`, stop on the
collapse guard, evaluate and checkpoint at the end.

A trainer provides `evaluate(step) -> metrics`, `train_step(step) -> metrics`, `checkpoint(step) ->
path`, `collapsed() -> bool`, `eval_history` [(step, accuracy)] and `run_dir`. Ray set-up and tear-down stay with
the caller, so this loop is the same whichever roles a job runs. Where the trainer has them, the loop
also records the step and each evaluation as live metrics (`telemetry`) and answers `rl-service
scale` requests for its pool (`roles`, rl_service/driver/elastic.py).

Progress: a bar on a terminal; elsewhere (a Ray job's log, a pipe) or with the bar off, one log
line every `logging.log_every` steps and one per evaluation (rl_service/progress.py); under the bar
the step lines go to RUN_DIR/driver.log only. The final evaluation is taken inside the bar, so the
bar ends on the accuracy the summary reports.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from rl_service.config import JobConfig
from rl_service.config.sections import CLUSTER_CHECKPOINT_EVERY
from rl_service.progress import StepProgress, format_eval_line, format_step_line, on_terminal, run_dir_log

log = logging.getLogger("rl_service")


@dataclass
class LoopResult:
    steps: int
    train_wall_s: float
    initial: dict
    final: dict
    stopped_reason: str
    checkpoint_path: Path | None


def loop_outcome(trainer, result: LoopResult) -> dict:
    """The summary fields every job reports about how its loop went (RL and preference jobs alike)."""
    return {
        "initial_eval_accuracy": result.initial.get("eval_accuracy"),
        "final_eval_accuracy": result.final.get("eval_accuracy"),
        "best_eval_accuracy": max((accuracy for _, accuracy in trainer.eval_history), default=None),
        "weight_version": trainer.weight_version,
        "stopped_reason": result.stopped_reason,
        # Absolute, as the run directory is printed: a relative --run-dir would leave it relative to
        # wherever the run was started.
        "final_checkpoint": str(Path(result.checkpoint_path).resolve()) if result.checkpoint_path else None,
    }


def checkpoint_every(config: JobConfig) -> int:
    """`checkpoint.every`, with none resolved: a run that joins a cluster (a submitted job, where Ray
    sets RAY_ADDRESS, or cluster.address) saves every CLUSTER_CHECKPOINT_EVERY steps, so a stopped
    or lost job can be resumed; a local run only at the end."""
    if config.checkpoint.every is not None:
        return config.checkpoint.every
    return CLUSTER_CHECKPOINT_EVERY if config.cluster.address_to_join() else 0


def guard_stop_reason(config: JobConfig, step: int, metrics: dict, nonfinite_in_a_row: int,
                      collapsed: bool) -> str | None:
    """Why the run must stop after `step`, or None. A stopped run keeps its newest checkpoint from before
    the stop (one with none is saved where it stopped) and exits with EXIT_GUARD_STOP, so a scheduler or
    a Ray job shows it as failed."""
    if nonfinite_in_a_row >= config.guard.max_nonfinite_steps:
        return (f"{nonfinite_in_a_row} steps in a row with a non-finite loss or gradient, up to step {step} "
                "(guard.max_nonfinite_steps)")
    if collapsed:
        return f"eval accuracy collapsed at step {step} (guard.max_eval_drop={config.guard.max_eval_drop})"
    # A reward that fails on every sample gives the step no signal at all; training on, the run would
    # report "completed" on rewards of 0 (a user's reward with a typo in it).
    errors, timeouts = metrics.get("custom_reward_errors", 0), metrics.get("custom_reward_timeouts", 0)
    scored = metrics.get("completions", 0) - metrics.get("pilot_completions", 0)
    if scored > 0 and errors + timeouts >= scored:
        return (f"reward.custom failed on every completion of step {step} ({errors:.0f} errors, {timeouts:.0f} "
                "timeouts; the reward's own error is in the reward actor's line above, and in Ray's logs); fix it, "
                "then resume the run")
    return None


def _record(trainer, step: int, evaluation: dict | None = None) -> None:
    telemetry = getattr(trainer, "telemetry", None)
    if telemetry is not None:
        telemetry.record_loop(step, evaluation)


def run_steps(config: JobConfig, trainer, start_step: int = 0) -> LoopResult:
    """Steps `start_step + 1` … `config.steps`; a resumed run (`start_step` > 0) does not evaluate
    again before its first step: the run it continues already did."""
    from rl_service.driver.elastic import ScaleListener

    bar = config.logging.progress_bar and on_terminal()
    line_every = config.logging.log_every
    every = checkpoint_every(config)
    if start_step == 0:
        initial = trainer.evaluate(step=0)
        log.info(format_eval_line(0, initial))
        _record(trainer, 0, initial)
    else:
        initial = trainer.run_dir.initial_evaluation() or (
            {"eval_accuracy": trainer.eval_history[0][1]} if trainer.eval_history else {})
        log.info("resuming after step %d", start_step)
    stopped_reason, step, last_eval = "completed", start_step, (start_step, initial)
    nonfinite_in_a_row = 0
    loop_started = time.perf_counter()
    listener = ScaleListener.for_trainer(config, trainer)
    metrics: dict = {}
    try:
        with StepProgress(config.steps, enabled=bar, completed=start_step) as progress:
            for step in range(start_step + 1, config.steps + 1):
                metrics = trainer.train_step(step)
                if line_every and (step % line_every == 0 or step == config.steps):
                    # Under the bar a step line would break it: it goes to RUN_DIR/driver.log alone.
                    (run_dir_log if bar else log).info(format_step_line(step, config.steps, metrics))
                evaluation = None
                if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                    evaluation = trainer.evaluate(step)
                    metrics.update(evaluation)
                    last_eval = (step, evaluation)
                    log.info(format_eval_line(step, evaluation))
                _record(trainer, step, evaluation)
                progress.update(step, metrics, trainer.eval_history)
                nonfinite_in_a_row = nonfinite_in_a_row + 1 if metrics.get("nonfinite_update_fraction", 0.0) > 0 else 0
                guard_stop = guard_stop_reason(config, step, metrics, nonfinite_in_a_row, trainer.collapsed())
                if guard_stop is not None:   # before this step's checkpoint: an earlier one stays the newest
                    stopped_reason = guard_stop
                    log.error(stopped_reason)
                    break
                if every and step % every == 0 and step < config.steps:
                    trainer.checkpoint(step)
            train_wall_s = time.perf_counter() - loop_started
            if last_eval[0] != step:
                final = trainer.evaluate(step)
                log.info(format_eval_line(step, final))
                _record(trainer, step, final)
                progress.update(step, metrics, trainer.eval_history)
            else:
                final = last_eval[1]
    finally:
        if listener is not None:
            listener.stop()
    # After a guard stop the newest checkpoint from before it stays the newest; a run with none yet (a
    # local run saves only at its end) is saved where it stopped, so its training is not lost.
    earlier = None if stopped_reason == "completed" else trainer.run_dir.latest_checkpoint()
    checkpoint = earlier or trainer.checkpoint(step)
    return LoopResult(step, train_wall_s, initial, final, stopped_reason, checkpoint)
