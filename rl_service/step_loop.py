"""The outer loop every job shares (RL and preference jobs alike): evaluate, train step by step with
a progress bar, evaluate every `eval_every` steps, checkpoint every `checkpoint.every`, stop on the
collapse guard, evaluate and checkpoint at the end.

A trainer provides `evaluate(step) -> metrics`, `train_step(step) -> metrics`, `checkpoint(step) ->
path`, `collapsed() -> bool` and `eval_history` [(step, accuracy)]. Ray set-up and tear-down stay with
the caller, so this loop is the same whichever roles a job runs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from rl_service.config import JobConfig
from rl_service.progress import StepProgress

log = logging.getLogger("rl_service")


@dataclass
class LoopResult:
    steps: int
    train_wall_s: float
    initial: dict
    final: dict
    stopped_reason: str
    checkpoint_path: Path


def run_steps(config: JobConfig, trainer) -> LoopResult:
    initial = trainer.evaluate(step=0)
    accuracies = ", ".join(f"{key} {value:.3f}" for key, value in initial.items() if key.startswith("eval_accuracy"))
    log.info("initial eval: %s", accuracies or "no eval split")
    stopped_reason, step, last_eval = "completed", 0, (0, initial)
    loop_started = time.perf_counter()
    with StepProgress(config.steps, enabled=config.logging.progress_bar) as progress:
        for step in range(1, config.steps + 1):
            metrics = trainer.train_step(step)
            if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                evaluation = trainer.evaluate(step)
                metrics.update(evaluation)
                last_eval = (step, evaluation)
            progress.update(step, metrics, trainer.eval_history)
            if config.checkpoint.every and step % config.checkpoint.every == 0 and step < config.steps:
                trainer.checkpoint(step)
            if trainer.collapsed():
                stopped_reason = f"eval accuracy collapsed at step {step} (guard.max_eval_drop={config.guard.max_eval_drop})"
                log.warning(stopped_reason)
                break
    train_wall_s = time.perf_counter() - loop_started
    final = trainer.evaluate(step) if last_eval[0] != step else last_eval[1]
    return LoopResult(step, train_wall_s, initial, final, stopped_reason, trainer.checkpoint(step))
