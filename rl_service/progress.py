"""Terminal output of a run: a rich progress bar while it trains (on a terminal), log lines per step
and per evaluation (in a job log, a pipe, or with the bar off), and a summary table at the end.

A rich bar in a file renders once, at the end: a Ray job's log (`rl-service logs JOB --follow`, the
dashboard's job page) would show nothing while the job trains. So where stdout is not a terminal,
or the bar is off, the loop logs one line every `logging.log_every` steps, in the manner of verl's
and OpenRLHF's console loggers (`step 12/50 | reward 0.375 | ...`), and every evaluation with its
step. `format_step_line` and `format_eval_line` are pure (no Ray, no terminal).
"""
from __future__ import annotations

import logging
import math

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


# (metrics key, label, format) of a step line, in order; a key the step did not produce is left out
# (no KL term without algorithm.kl_coef, no accepted fraction in a preference job).
STEP_LINE_FIELDS = (
    ("reward_mean", "reward", ".4f"),
    ("accepted_fraction", "accepted", ".3f"),
    ("loss", "loss", ".4g"),
    ("kl_k3_mean", "kl", ".4g"),
    ("grad_norm", "grad_norm", ".4g"),
    ("completions_per_s", "compl/s", ".1f"),
)
PHASES = ("generate", "reward", "statistics", "train", "publish", "scale", "driver")


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def format_step_line(step: int, total_steps: int, metrics: dict) -> str:
    """`step 12/50 | reward 0.3750 | accepted 0.250 | loss 0.0123 | kl 0.0004 | grad_norm 0.51 |
    compl/s 210.5 | time 1.23s: generate 61% reward 3% train 30% ...`: the step's phase shares are
    each phase's seconds over the step's wall seconds."""
    parts = [f"step {step}/{total_steps}"]
    for key, label, spec in STEP_LINE_FIELDS:
        value = _number(metrics.get(key))
        if key in metrics:
            parts.append(f"{label} {value:{spec}}" if value is not None else f"{label} nan")
    seconds = _number(metrics.get("step_seconds"))
    if seconds:
        shares = [f"{name} {100 * metrics[f'time_{name}_s'] / seconds:.0f}%" for name in PHASES
                  if _number(metrics.get(f"time_{name}_s")) is not None]
        parts.append(f"time {seconds:.2f}s: " + " ".join(shares))
    return " | ".join(parts)


def format_eval_line(step: int, evaluation: dict) -> str:
    """`eval step 30 | accuracy 0.5160 | accuracy_level_1 0.9000 ...`: the step it was taken after
    (0: before training)."""
    accuracies = [f"{key.removeprefix('eval_')} {value:.4f}" for key, value in evaluation.items()
                  if key.startswith("eval_accuracy") and _number(value) is not None]
    return " | ".join([f"eval step {step}"] + (accuracies or ["no eval split"]))


# Lines for RUN_DIR/driver.log alone (driver/training_run.py attaches the file): a step line under the
# progress bar, a run's end. Not propagated, so the terminal does not get them twice.
run_dir_log = logging.getLogger("rl_service.run_dir_only")
run_dir_log.propagate = False


def on_terminal() -> bool:
    """Whether stdout is a terminal as rich sees it (FORCE_COLOR / TTY_COMPATIBLE count as one)."""
    return Console().is_terminal


class StepProgress:
    def __init__(self, total_steps: int, enabled: bool = True, completed: int = 0):
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"), disable=not enabled, transient=False)
        self.task = self.progress.add_task("train", total=total_steps, completed=completed, status="")

    def __enter__(self) -> "StepProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, metrics: dict, eval_history: list[tuple[int, float]]) -> None:
        """`eval_history`: [(step, accuracy)]; the bar shows the latest, with its step."""
        accuracy = f" eval {eval_history[-1][1]:.4f} (step {eval_history[-1][0]})" if eval_history else ""
        status = (f"reward {metrics.get('reward_mean', 0):.3f}{accuracy} "
                  f"{metrics.get('completions_per_s', 0):.0f} compl/s")
        self.progress.update(self.task, completed=step, status=status)


SUMMARY_KEYS = ("steps", "completions", "completion_tokens", "train_wall_s", "completions_per_s", "tokens_per_s",
                "initial_eval_accuracy", "final_eval_accuracy", "best_eval_accuracy", "stopped_reason")


def print_summary(summary: dict, run_dir: str) -> None:
    """A table on a terminal; elsewhere (a job's log, a pipe) a line per figure: rich wrapped the table
    to 80 columns there, cutting the run directory and the stop reason across lines."""
    shown = {key: (f"{value:.4g}" if isinstance(value, float) else str(value))
             for key, value in ((key, summary.get(key)) for key in SUMMARY_KEYS)}
    if not on_terminal():
        print("\n".join([f"rl_service run: {run_dir}", *(f"  {key}: {value}" for key, value in shown.items())]),
              flush=True)
        return
    table = Table(title=f"rl_service run: {run_dir}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in shown.items():
        table.add_row(key, value)
    Console().print(table)
