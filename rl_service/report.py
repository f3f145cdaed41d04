"""`rl-service report RUN_DIR [--out DIR]`: PNG plots of a run's `metrics.jsonl`.

The file holds one JSON object per line, written by `RunDirectory.log` (run_dir.py): a training
step's row and, at evaluation steps, a second row with the same `step` and the `eval_*` keys.
Values that were not finite were written as `null`; they become gaps in the lines here.

Plots, each from the keys the driver really logs (driver.py `train_step`/`evaluate`,
preference_loop.py, algorithms/gvm.py `allocation_spread_metrics`, algorithms/preference.py
`OnlineAlphaEstimator.metrics`):

  reward.png          reward_mean (+ reward_mean_<mode> of BVPO runs), accepted_fraction
  eval_accuracy.png   eval_accuracy (+ eval_accuracy_<group>: difficulty level or reasoning mode)
  throughput.png      completions_per_s (samples/s) and tokens_per_s
  step_time.png       time_<phase>_s stacked: generate, reward, statistics, train, publish (the
                      weight sync), driver
  gvm_allocation.png  allocation_samples_min/median/max, allocation_hardest_decile_share,
                      allocation_zero_fraction
  alpha_hat.png       bvpo_alpha (α̂, the online estimate) and alpha (the α the loss used)
  pass_at_k.png       eval_pass_at_<k'> against k' at the first and last evaluation, and
                      eval_pass_at_<k> / eval_mean_at_<k> over steps (eval.samples set)

A plot whose keys a run never logged (a GRPO run has no α̂) is skipped with a one-line notice.
A missing run directory or metrics file, an empty file or a malformed line is a `UserError` naming
the file and line (the CLI prints it on one line and exits with code 2). The one exception is an
unterminated last line that does not parse: the run is still writing it, or was killed while it
did, so it is left out with a notice instead of hiding every plot of a live run.
"""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rl_service.errors import UserError

METRICS_FILE = "metrics.jsonl"
DEFAULT_REPORT_SUBDIR = "report"

# Phases in the order a step runs them (driver.py's PhaseTimer); phases a future driver adds are
# stacked after these, in name order.
STEP_PHASES = ("generate", "reward", "statistics", "train", "publish", "driver")
_PHASE_KEY = re.compile(r"^time_(?P<phase>.+)_s$")
_PHASE_LABELS = {"publish": "publish (weight sync)"}


@dataclass
class MetricSeries:
    """Every numeric key of a run as {step: value}; a later row for the same step and key wins."""
    source: Path
    values: dict[str, dict[int, float]] = field(default_factory=lambda: defaultdict(dict))
    rows: int = 0

    def has_any(self, *keys: str) -> bool:
        return any(key in self.values for key in keys)

    def points(self, key: str) -> tuple[list[int], list[float]]:
        by_step = self.values.get(key, {})
        steps = sorted(by_step)
        return steps, [by_step[step] for step in steps]

    def keys_with_prefix(self, prefix: str) -> list[str]:
        return sorted(key for key in self.values if key.startswith(prefix))


@dataclass
class ReportResult:
    written: list[Path]
    notices: list[str]


def read_metrics(metrics_file: Path, notices: list[str]) -> MetricSeries:
    """Parse `metrics_file`; raise `UserError` naming the file and line on bad input."""
    if not metrics_file.is_file():
        raise UserError(f"{metrics_file}: metrics file not found (a run directory holds one from its first step)")
    try:
        text = metrics_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = _line_of_byte(metrics_file.read_bytes(), exc.start)
        raise UserError(f"{metrics_file}:{line}: not UTF-8 text") from None
    series = MetricSeries(metrics_file)
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            unterminated_last = number == len(lines) and not text.endswith("\n")
            if unterminated_last:
                notices.append(f"{metrics_file}:{number}: left out an incomplete last line (run still writing, or killed)")
                continue
            raise UserError(f"{metrics_file}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise UserError(f"{metrics_file}:{number}: expected a JSON object per line, got {type(row).__name__}")
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise UserError(f"{metrics_file}:{number}: needs a non-negative integer 'step', got {step!r}")
        for key, value in row.items():
            if key == "step":
                continue
            if value is None:
                series.values[key][step] = math.nan   # logged non-finite: a gap in the line
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                series.values[key][step] = float(value)
            # other types (none logged today) are not plottable and are left out
        series.rows += 1
    if series.rows == 0:
        raise UserError(f"{metrics_file}: no metrics rows (the file is empty)")
    return series


def _line_of_byte(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


# -- the plots ---------------------------------------------------------------------------------

def _new_axes(figure, title: str, ylabel: str, position: int = 111):
    axes = figure.add_subplot(position)
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    return axes


def _draw_reward(series: MetricSeries, figure) -> None:
    axes = _new_axes(figure, "Reward", "reward")
    if series.has_any("reward_mean"):
        axes.plot(*series.points("reward_mean"), label="reward_mean", linewidth=2)
    for key in series.keys_with_prefix("reward_mean_"):   # BVPO: reasoning_on / reasoning_off
        axes.plot(*series.points(key), label=key, linestyle="--")
    if series.has_any("accepted_fraction"):
        axes.plot(*series.points("accepted_fraction"), label="accepted_fraction", linestyle=":")
    axes.legend(loc="best")


def _draw_eval_accuracy(series: MetricSeries, figure) -> None:
    axes = _new_axes(figure, "Greedy eval accuracy", "accuracy")
    if series.has_any("eval_accuracy"):
        axes.plot(*series.points("eval_accuracy"), marker="o", linewidth=2, label="eval_accuracy")
    for key in series.keys_with_prefix("eval_accuracy_"):  # per difficulty level or reasoning mode
        axes.plot(*series.points(key), marker=".", linewidth=1, alpha=0.7, label=key)
    axes.set_ylim(-0.02, 1.02)
    axes.legend(loc="best", fontsize="small")


def _draw_throughput(series: MetricSeries, figure) -> None:
    axes = _new_axes(figure, "Throughput", "completions (samples) / s")
    handles = []
    if series.has_any("completions_per_s"):
        handles += axes.plot(*series.points("completions_per_s"), label="samples/s (completions_per_s)")
    if series.has_any("tokens_per_s"):
        # Tokens/s is ~completion length × samples/s: its own axis keeps both readable.
        tokens_axes = axes.twinx()
        tokens_axes.set_ylabel("completion tokens / s")
        handles += tokens_axes.plot(*series.points("tokens_per_s"), color="tab:orange", label="tokens/s (tokens_per_s)")
    axes.legend(handles=handles, loc="best")


def _phase_keys(series: MetricSeries) -> list[tuple[str, str]]:
    found = {match["phase"]: key for key in series.values if (match := _PHASE_KEY.match(key))}
    ordered = [phase for phase in STEP_PHASES if phase in found] + sorted(set(found) - set(STEP_PHASES))
    return [(phase, found[phase]) for phase in ordered]


def _draw_step_time(series: MetricSeries, figure) -> None:
    axes = _new_axes(figure, "Step time by phase (stacked)", "seconds")
    phases = _phase_keys(series)
    steps = sorted({step for _, key in phases for step in series.values[key]})
    stacked = []
    for _, key in phases:
        by_step = series.values[key]
        # A phase a step did not run (no publish in an offline step) or a null adds nothing.
        stacked.append([value if math.isfinite(value := by_step.get(step, 0.0)) else 0.0 for step in steps])
    axes.stackplot(steps, *stacked, labels=[_PHASE_LABELS.get(phase, phase) for phase, _ in phases], alpha=0.85)
    axes.legend(loc="upper left", fontsize="small", ncol=2)


def _draw_gvm_allocation(series: MetricSeries, figure) -> None:
    counts = _new_axes(figure, "Samples per prompt in each step's allocation", "samples per prompt", 211)
    if series.has_any("allocation_samples_min", "allocation_samples_max"):
        low, high = series.values.get("allocation_samples_min", {}), series.values.get("allocation_samples_max", {})
        both = sorted(set(low) & set(high))
        counts.fill_between(both, [low[s] for s in both], [high[s] for s in both], alpha=0.2, label="min – max")
    for key, style in (("allocation_samples_max", "-"), ("allocation_samples_median", "--"), ("allocation_samples_min", "-")):
        if series.has_any(key):
            counts.plot(*series.points(key), linestyle=style, label=key.removeprefix("allocation_samples_"))
    counts.legend(loc="best", fontsize="small")
    shares = _new_axes(figure, "Budget concentration", "fraction", 212)
    for key in ("allocation_hardest_decile_share", "allocation_zero_fraction"):
        if series.has_any(key):
            shares.plot(*series.points(key), label=key.removeprefix("allocation_"))
    shares.set_ylim(-0.02, 1.02)
    shares.legend(loc="best", fontsize="small")


def _draw_alpha_hat(series: MetricSeries, figure) -> None:
    axes = _new_axes(figure, "BVPO mixing weight", "α")
    if series.has_any("bvpo_alpha"):
        axes.plot(*series.points("bvpo_alpha"), linewidth=2, label="α̂ (online estimate, bvpo_alpha)")
    if series.has_any("alpha"):
        axes.plot(*series.points("alpha"), linestyle="--", label="α used in the loss (alpha)")
    axes.set_ylim(-0.02, 1.02)
    axes.legend(loc="best")


def _pass_at_k_keys(series: MetricSeries) -> list[tuple[int, str]]:
    return sorted((int(key.removeprefix("eval_pass_at_")), key) for key in series.keys_with_prefix("eval_pass_at_")
                  if key.removeprefix("eval_pass_at_").isdigit())


def _draw_pass_at_k(series: MetricSeries, figure) -> None:
    keys = _pass_at_k_keys(series)
    curve = _new_axes(figure, "Sampled eval: pass@k' by k'", "pass@k'", 121)
    curve.set_xlabel("k'")
    steps = sorted({step for _, key in keys for step in series.values[key]})
    for step in dict.fromkeys((steps[0], steps[-1])) if steps else ():
        ks = [k for k, key in keys if step in series.values[key]]
        curve.plot(ks, [series.values[f"eval_pass_at_{k}"][step] for k in ks], marker="o", label=f"step {step}")
    curve.set_ylim(-0.02, 1.02)
    curve.legend(loc="best")
    over_steps = _new_axes(figure, "pass@k and mean@k over steps", "fraction", 122)
    if keys:
        over_steps.plot(*series.points(keys[-1][1]), marker="o", linewidth=2, label=f"pass@{keys[-1][0]}")
    for key in series.keys_with_prefix("eval_mean_at_"):
        over_steps.plot(*series.points(key), marker=".", linestyle="--", label=key.replace("eval_mean_at_", "mean@"))
    over_steps.set_ylim(-0.02, 1.02)
    over_steps.legend(loc="best")


@dataclass(frozen=True)
class PlotSpec:
    filename: str
    needs_any: tuple[str, ...]   # drawn when the run logged at least one of these keys
    draw: Callable[[MetricSeries, object], None]
    size: tuple[float, float] = (8.0, 4.5)


PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("reward.png", ("reward_mean", "accepted_fraction"), _draw_reward),
    PlotSpec("eval_accuracy.png", ("eval_accuracy",), _draw_eval_accuracy),
    PlotSpec("throughput.png", ("completions_per_s", "tokens_per_s"), _draw_throughput),
    PlotSpec("step_time.png", tuple(f"time_{phase}_s" for phase in STEP_PHASES), _draw_step_time),
    PlotSpec("gvm_allocation.png", ("allocation_samples_min", "allocation_samples_median", "allocation_samples_max",
                                    "allocation_hardest_decile_share", "allocation_zero_fraction"),
             _draw_gvm_allocation, (8.0, 7.0)),
    PlotSpec("alpha_hat.png", ("bvpo_alpha", "alpha"), _draw_alpha_hat),
    PlotSpec("pass_at_k.png", ("eval_pass_at_1",), _draw_pass_at_k, (11.0, 4.5)),
)


def _wants(plot: PlotSpec, series: MetricSeries) -> bool:
    if plot.draw is _draw_step_time:
        return bool(_phase_keys(series))   # any time_<phase>_s, not only the phases known today
    return series.has_any(*plot.needs_any)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> ReportResult:
    """Write every plot the run's metrics support into `out_dir` (default RUN_DIR/report)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserError(f"{run_dir}: run directory not found")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory (give the run directory that holds {METRICS_FILE})")
    notices: list[str] = []
    series = read_metrics(run_dir / METRICS_FILE, notices)
    out = Path(out_dir) if out_dir is not None else run_dir / DEFAULT_REPORT_SUBDIR
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory (--out takes a directory)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create the report directory ({exc.strerror})") from None

    # The object-oriented Figure API renders with Agg and keeps no pyplot global state, so no
    # display or GUI backend is needed (a head node or CI has none).
    from matplotlib.figure import Figure

    written = []
    for plot in PLOTS:
        if not _wants(plot, series):
            notices.append(f"skipped {plot.filename}: the run logged none of {', '.join(plot.needs_any)}")
            continue
        figure = Figure(figsize=plot.size, dpi=100, layout="constrained")
        plot.draw(series, figure)
        target = out / plot.filename
        try:
            figure.savefig(target, format="png")
        except OSError as exc:
            raise UserError(f"{target}: cannot write the plot ({exc.strerror})") from None
        written.append(target)
    return ReportResult(written, notices)
