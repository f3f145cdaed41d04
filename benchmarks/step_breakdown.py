"""Where a training step's time goes: generation, reward, statistics, training, weight publication,
and the driver's own overhead (time outside every wait on an actor), on the quickstart job.

    .venv/bin/python benchmarks/step_breakdown.py [--steps 20] [--config configs/quickstart.yaml] [--set k=v ...]

Runs the real job (Ray, DeepSpeed, the built-in model), skips the first step (warm-up), and prints
the mean seconds per step of each phase, its share of the step, and the absolute throughput.
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine  # noqa: E402
PHASES = ("generate", "reward", "statistics", "train", "publish", "driver")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    from rl_service.config import load_config
    from rl_service.driver import prepare_job, run_training

    overrides = [f"steps={args.steps}", "eval_every=0", "logging.progress_bar=false", "logging.tensorboard=false",
                 "data.eval_limit=32", *args.overrides]
    config = load_config(args.config, overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        summary = run_training(prepare_job(config), run_dir)
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "step_seconds" in row][1:] or [row for row in rows if "step_seconds" in row]
    step_s = float(np.mean([row["step_seconds"] for row in steps]))
    result = {"machine": machine(), "steps_measured": len(steps), "step_s": step_s}
    print(f"machine: {result['machine']}")
    print(f"{'phase':<12}{'s/step':>10}{'share':>9}")
    for phase in PHASES:
        seconds = float(np.mean([row.get(f"time_{phase}_s", 0.0) for row in steps]))
        result[f"{phase}_s"] = seconds
        print(f"{phase:<12}{seconds:>10.4f}{seconds / step_s:>9.1%}")
    result["driver_overhead_fraction"] = float(np.mean([row["driver_overhead_fraction"] for row in steps]))
    result["completions_per_s"] = float(np.mean([row["completions_per_s"] for row in steps]))
    result["tokens_per_s"] = float(np.mean([row["tokens_per_s"] for row in steps]))
    result["run_completions_per_s"] = summary["completions_per_s"]
    print(f"step {step_s:.3f} s, driver overhead {result['driver_overhead_fraction']:.2%}, "
          f"{result['completions_per_s']:.1f} completions/s, {result['tokens_per_s']:.0f} tokens/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
