"""Trace-only DPO vs BVPO (α = 0.5) vs BVPO with online α̂ on the built-in model (ALGORITHMS.md §DPO,
§BVPO.3, §BVPO.6), online, several seeds.

    .venv/bin/python benchmarks/bvpo_vs_dpo.py [--seeds 0 1 2] [--steps 10] [--methods dpo bvpo_0.5 bvpo_alpha_hat] [--set k=v ...]

Every (method, seed) is a real run of configs/bvpo.yaml (Ray, DeepSpeed, the HF generator, the
verifier) with the same overrides: the seed fixes the data (split and prompt order), so the three
methods see the same prompts in the same steps with the same sampling; only the loss differs:

  dpo             algorithm.name=dpo: trace pairs only (BVPO with α = 1), no reasoning-off samples
  bvpo_0.5        α = 0.5, the paper's setting (§BVPO.3)
  bvpo_alpha_hat  α̂ from K = 4 trace resamples on the output head, EMA 0.9 (§BVPO.6, ours)

(BVPO trains only prompts with a pair in both modes, DPO every prompt with a trace pair, so the
pair counts differ; both are listed.) Per method, mean ± std over seeds of: greedy eval accuracy
with reasoning on and off after training and its change from the start (same eval split per seed),
the variance over steps of the pre-clip gradient norm, mean α, pairs trained and run seconds.
Defaults keep the whole benchmark near 10–15 min on 2 CPU cores. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine  # noqa: E402
os.environ.setdefault("DS_ACCELERATOR", "cpu")

METHODS = {
    "dpo": ["algorithm.name=dpo", "preference.alpha=1.0"],
    "bvpo_0.5": ["algorithm.name=bvpo", "preference.alpha=0.5", "preference.alpha_mode=fixed"],
    "bvpo_alpha_hat": ["algorithm.name=bvpo", "preference.alpha_mode=online", "preference.alpha_resamples=4",
                       "preference.alpha_ema=0.9"],
}
MODES = ("reasoning_on", "reasoning_off")



def run_one(method: str, seed: int, steps: int, overrides: list[str]) -> dict:
    from rl_service.config import load_config
    from rl_service.driver import prepare_job, run_training

    config = load_config(REPO / "configs" / "bvpo.yaml", [
        f"seed={seed}", f"steps={steps}", "eval_every=0", "logging.progress_bar=false", "logging.tensorboard=false",
        "guard.max_eval_drop=null", *overrides, *METHODS[method]])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        summary = run_training(prepare_job(config), run_dir)
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    trained = [row for row in rows if row.get("grad_norm") is not None]
    grad_norms = np.array([row["grad_norm"] for row in trained], dtype=np.float64)
    result = {"method": method, "seed": seed, "seconds": time.perf_counter() - started,
              "grad_norm_variance": float(np.var(grad_norms, ddof=1)) if len(grad_norms) > 1 else float("nan"),
              "grad_norm_mean": float(grad_norms.mean()) if len(grad_norms) else float("nan"),
              "alpha_mean": float(np.mean([row["alpha"] for row in trained])) if trained else float("nan"),
              "pairs": summary["pairs_trained"], "nan_skipped_steps": summary["nan_skipped_steps"]}
    for mode in MODES:
        result[f"accuracy_{mode}"] = summary[f"final_eval_accuracy_{mode}"]
        result[f"accuracy_change_{mode}"] = summary[f"final_eval_accuracy_{mode}"] - summary[f"initial_eval_accuracy_{mode}"]
    return result


def _mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra config override for every run, e.g. learner.lr=5e-5")
    args = parser.parse_args()
    overrides = ["data.arithmetic.levels=[1,2,3]", "data.arithmetic.num_eval=64", "data.prompts_per_step=16",
                 "generator.samples_per_prompt=8", "generator.max_new_tokens=48", *args.overrides]

    started = time.perf_counter()
    runs = []
    for seed in args.seeds:
        for method in args.methods:
            runs.append(run_one(method, seed, args.steps, overrides))
            print(f"  {method:<15} seed {seed}: on {runs[-1]['accuracy_reasoning_on']:.3f} "
                  f"off {runs[-1]['accuracy_reasoning_off']:.3f} grad-norm var {runs[-1]['grad_norm_variance']:.4f} "
                  f"({runs[-1]['seconds']:.0f} s)", flush=True)

    columns = ("accuracy_reasoning_on", "accuracy_change_reasoning_on", "accuracy_reasoning_off",
               "accuracy_change_reasoning_off", "grad_norm_variance", "grad_norm_mean", "alpha_mean", "pairs", "seconds")
    table = {}
    for method in args.methods:
        mine = [run for run in runs if run["method"] == method]
        table[method] = {column: _mean_std([run[column] for run in mine]) for column in columns}
    print(f"machine: {machine()}")
    print(f"{len(args.seeds)} seeds × {args.steps} steps, overrides: {' '.join(overrides)}")
    header = ("method", "acc on", "Δ on", "acc off", "Δ off", "gnorm var", "gnorm mean", "α mean", "pairs", "s/run")
    print("".join(f"{name:>16}" if k else f"{name:<16}" for k, name in enumerate(header)))
    for method, stats in table.items():
        cells = [f"{stats[c][0]:.3f}±{stats[c][1]:.3f}" if c not in ("pairs", "seconds") else f"{stats[c][0]:.0f}±{stats[c][1]:.0f}"
                 for c in columns]
        print(f"{method:<16}" + "".join(f"{cell:>16}" for cell in cells))
    result = {"machine": machine(), "seeds": args.seeds, "steps": args.steps, "overrides": overrides,
              "wall_seconds": time.perf_counter() - started,
              "methods": {method: {column: {"mean": stats[column][0], "std": stats[column][1]} for column in columns}
                          for method, stats in table.items()},
              "runs": runs}
    print(json.dumps(_finite_or_null(result), sort_keys=True))


def _finite_or_null(value):
    """JSON has no NaN: a statistic with too few values is null."""
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(item) for item in value]
    return None if isinstance(value, float) and not np.isfinite(value) else value


if __name__ == "__main__":
    main()
