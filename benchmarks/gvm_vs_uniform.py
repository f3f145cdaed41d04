"""GVM vs uniform sample allocation, for RAFT++ and for GRPO (ALGORITHMS.md §GVM, miniature experiment).

    .venv/bin/python benchmarks/gvm_vs_uniform.py --seeds 3 [--steps 40] [--target-gain 0.08]

Every run starts from the same shipped model on the built-in task with all five difficulty levels
mixed, and spends the same budget per step (prompts_per_step × samples_per_prompt). The only change
between the paired runs is `statistics.allocation: uniform | gvm` (online GVM, §GVM.6). For each run
we record the steps **and** the generated samples (pilot included: every completion counts) until
greedy eval accuracy first reaches `initial + target_gain`; a run that never reaches it is counted at
its full length and flagged (so ratios are then a lower bound on GVM's cost or gain).
Seeds change data order, sampling and the train split; the eval split is fixed per seed.
The last line is one JSON object: `raft_samples_ratio`, `raft_steps_ratio`, `grpo_samples_ratio`,
`grpo_steps_ratio` (GVM / uniform, lower is better), plus the per-run figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine as common_machine  # noqa: E402

ALGORITHMS = {"raft": "raft++", "grpo": "grpo"}


def run_once(algorithm: str, allocation: str, seed: int, args) -> dict:
    from rl_service.config import load_config
    from rl_service.driver import prepare_job, run_training

    overrides = [f"seed={seed}", f"steps={args.steps}", f"eval_every={args.eval_every}",
                 f"algorithm.name={ALGORITHMS[algorithm]}", f"statistics.allocation={allocation}",
                 f"data.prompts_per_step={args.prompts}", f"generator.samples_per_prompt={args.samples}",
                 f"data.arithmetic.num_train={args.num_train}", f"data.eval_limit={args.eval_prompts}",
                 "logging.progress_bar=false", "logging.tensorboard=false", "guard.max_eval_drop=null",
                 f"statistics.n_min={2 if algorithm == 'grpo' else 1}", f"statistics.n_max={4 * args.samples}",
                 *args.overrides]
    config = load_config(REPO / "configs" / "quickstart.yaml", overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        run_training(prepare_job(config), run_dir)
        wall = time.perf_counter() - started
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [(row["step"], row["eval_accuracy"]) for row in rows if "eval_accuracy" in row]
    samples_by_step, total = {0: 0}, 0
    for row in rows:
        if "step_seconds" in row:
            total += int(row["completions"])
            samples_by_step[row["step"]] = total
    initial = evals[0][1]
    target = initial + args.target_gain
    reached = next(((step, accuracy) for step, accuracy in evals if accuracy >= target), None)
    step = reached[0] if reached else max(samples_by_step)
    return {"algorithm": algorithm, "allocation": allocation, "seed": seed, "initial": initial,
            "final": evals[-1][1], "best": max(accuracy for _, accuracy in evals), "target": target,
            "reached": reached is not None, "steps_to_target": step, "samples_to_target": samples_by_step[step],
            "wall_s": wall, "eval_curve": evals,
            "samples_at_eval": [samples_by_step[eval_step] for eval_step, _ in evals]}


def summarise(runs: list[dict], algorithm: str, allocation: str, key: str) -> tuple[float, float]:
    values = [run[key] for run in runs if run["algorithm"] == algorithm and run["allocation"] == allocation]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--eval-prompts", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--num-train", type=int, default=256,
                        help="a small pool so prompts recur and the moving averages have something to remember")
    parser.add_argument("--target-gain", type=float, default=0.06)
    parser.add_argument("--algorithms", nargs="+", default=["raft", "grpo"], choices=sorted(ALGORITHMS))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    machine = common_machine()
    print(f"machine: {machine}", flush=True)
    runs = []
    for algorithm in args.algorithms:
        for seed in range(args.seeds):
            for allocation in ("uniform", "gvm"):
                run = run_once(algorithm, allocation, seed, args)
                runs.append(run)
                print(json.dumps(run), flush=True)
    print(f"\n{'algorithm':<10}{'allocation':<11}{'steps→target':>16}{'samples→target':>20}{'final acc':>14}{'reached':>9}")
    result: dict = {"machine": machine, "seeds": args.seeds, "steps": args.steps, "target_gain": args.target_gain,
                    "budget_per_step": args.prompts * args.samples}
    for algorithm in args.algorithms:
        for allocation in ("uniform", "gvm"):
            steps_mean, steps_sd = summarise(runs, algorithm, allocation, "steps_to_target")
            samples_mean, samples_sd = summarise(runs, algorithm, allocation, "samples_to_target")
            final_mean, final_sd = summarise(runs, algorithm, allocation, "final")
            reached = sum(run["reached"] for run in runs if run["algorithm"] == algorithm and run["allocation"] == allocation)
            print(f"{algorithm:<10}{allocation:<11}{steps_mean:>9.1f} ± {steps_sd:<4.1f}{samples_mean:>12.0f} ± {samples_sd:<5.0f}"
                  f"{final_mean:>8.3f} ± {final_sd:.3f}{reached:>5}/{args.seeds}")
            result[f"{algorithm}_{allocation}"] = {"steps_mean": steps_mean, "steps_sd": steps_sd,
                                                   "samples_mean": samples_mean, "samples_sd": samples_sd,
                                                   "final_accuracy_mean": final_mean, "reached": reached}
        for key, name in (("samples", "samples"), ("steps", "steps")):
            uniform = result[f"{algorithm}_uniform"][f"{key}_mean"]
            result[f"{algorithm}_{name}_ratio"] = result[f"{algorithm}_gvm"][f"{key}_mean"] / uniform if uniform else None
    result["runs"] = runs
    print(json.dumps(result))


if __name__ == "__main__":
    main()
