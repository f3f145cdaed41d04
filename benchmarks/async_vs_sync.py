"""Async vs sync mode on the quickstart job: samples per second, and accuracy for the same samples
and for the same training time (issue "Throughput: asynchronous rollout and training").

    .venv/bin/python benchmarks/async_vs_sync.py --seeds 3 [--steps 60] [--eval-every 10] [--set k=v ...]

For each seed, the quickstart runs twice from the shipped model: `schedule.mode: sync`, and
`schedule.mode: async` with `max_staleness` 1 (generation of step k+1 overlaps training on step k).
Both train the same number of steps on the same budget per step, so the final evals compare the two
at equal samples. Training time is the sum of step times (evaluation excluded: it is the same work in
both modes). The time budget is the faster mode's median training time for the whole run; "accuracy
at the time budget" is each run's last eval reached within it, i.e. what each mode has learned by the
time the faster one is done. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine  # noqa: E402

MODES = {"sync": ["schedule.mode=sync"], "async": ["schedule.mode=async", "schedule.max_staleness=1"]}


def run_once(mode: str, seed: int, args) -> dict:
    from rl_service.config import load_config
    from rl_service.driver import prepare_job, run_training

    overrides = [f"seed={seed}", f"steps={args.steps}", f"eval_every={args.eval_every}", "logging.progress_bar=false",
                 "logging.tensorboard=false", "guard.max_eval_drop=null", *MODES[mode], *args.overrides]
    config = load_config(REPO / "configs" / "quickstart.yaml", overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        summary = run_training(prepare_job(config), run_dir)
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    train_seconds, curve = 0.0, []     # (training seconds so far, completions so far, eval accuracy)
    completions = 0
    for row in rows:
        train_seconds += row.get("step_seconds", 0.0)
        completions += int(row.get("completions", 0))
        if "eval_accuracy" in row:
            curve.append((train_seconds, completions, row["eval_accuracy"]))
    return {"mode": mode, "seed": seed, "train_seconds": train_seconds, "completions": completions,
            "completions_per_s": completions / train_seconds, "curve": curve,
            "final_eval_accuracy": summary["final_eval_accuracy"]}


def accuracy_at(curve: list[tuple], seconds: float) -> float:
    """The last eval reached within `seconds` of training."""
    return [accuracy for at, _, accuracy in curve if at <= seconds + 1e-9][-1]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    runs = [run_once(mode, seed, args) for seed in range(args.seeds) for mode in MODES]
    by_mode = {mode: [run for run in runs if run["mode"] == mode] for mode in MODES}
    # The time budget: when the faster mode's median run has finished training.
    budget = min(statistics.median(run["train_seconds"] for run in by_mode[mode]) for mode in MODES)
    result: dict = {"machine": machine(), "seeds": args.seeds, "steps": args.steps, "time_budget_s": budget}
    print(f"machine: {result['machine']}")
    print(f"{'mode':<7}{'compl/s':>10}{'train s':>10}{'final acc (same samples)':>28}{'acc at time budget':>22}")
    for mode, mode_runs in by_mode.items():
        rate = mean_std([run["completions_per_s"] for run in mode_runs])
        final = mean_std([run["final_eval_accuracy"] for run in mode_runs])
        at_budget = mean_std([accuracy_at(run["curve"], budget) for run in mode_runs])
        seconds = statistics.fmean(run["train_seconds"] for run in mode_runs)
        print(f"{mode:<7}{rate[0]:>10.1f}{seconds:>10.1f}{final[0]:>20.3f} ± {final[1]:.3f}"
              f"{at_budget[0]:>14.3f} ± {at_budget[1]:.3f}")
        result.update({f"{mode}_completions_per_s": rate[0], f"{mode}_train_seconds": seconds,
                       f"{mode}_final_accuracy_mean": final[0], f"{mode}_final_accuracy_std": final[1],
                       f"{mode}_accuracy_at_budget_mean": at_budget[0], f"{mode}_accuracy_at_budget_std": at_budget[1],
                       f"{mode}_final_accuracy_per_seed": [run["final_eval_accuracy"] for run in mode_runs]})
    result["async_vs_sync_throughput"] = result["async_completions_per_s"] / result["sync_completions_per_s"]
    result["final_accuracy_gap"] = result["async_final_accuracy_mean"] - result["sync_final_accuracy_mean"]
    result["final_accuracy_seed_spread"] = max(result["async_final_accuracy_std"], result["sync_final_accuracy_std"])
    print(f"async / sync throughput: {result['async_vs_sync_throughput']:.2f}x; final accuracy async − sync "
          f"{result['final_accuracy_gap']:+.3f} (seed std up to {result['final_accuracy_seed_spread']:.3f}); "
          f"time budget {budget:.0f} s of training")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
