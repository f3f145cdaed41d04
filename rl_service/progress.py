"""Terminal output of a run: a rich progress bar while it trains and a summary table at the end."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


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
        accuracy = f" eval {eval_history[-1][1]:.3f}" if eval_history else ""
        status = (f"reward {metrics.get('reward_mean', 0):.3f}{accuracy} "
                  f"{metrics.get('completions_per_s', 0):.0f} compl/s")
        self.progress.update(self.task, completed=step, status=status)


def print_summary(summary: dict, run_dir: str) -> None:
    table = Table(title=f"rl_service run: {run_dir}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("steps", "completions", "completion_tokens", "train_wall_s", "completions_per_s", "tokens_per_s",
                "initial_eval_accuracy", "final_eval_accuracy", "best_eval_accuracy", "stopped_reason"):
        value = summary.get(key)
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
