"""GVM vs uniform allocation vs DAPO dynamic sampling, GRPO and RAFT++ (ALGORITHMS.md §GVM, §DAPO).

    .venv/bin/python benchmarks/gvm_vs_uniform.py [--seeds 5] [--first-seed 0] [--steps 30] [--lr 5e-5] [--workers 1]
    .venv/bin/python benchmarks/gvm_vs_uniform.py --summarise benchmarks/results/gvm_vs_uniform_DATE.jsonl
    .venv/bin/python benchmarks/gvm_vs_uniform.py --config your_job.yaml --steps 200 [--lr ...]   # your model, data

The same arms on any GRPO job (`--config`; its model, dataset and learning rate, with the budget and
schedule set here): how to decide issue #21 at a scale this machine cannot reach.

Every run starts from the shipped model on the built-in task (levels 2-5 mixed: level 1 has only 200
distinct questions, too few for a 1,024-prompt eval split) with the same budget per step
(prompts_per_step × samples_per_prompt) and differs from its uniform twin only in how samples are
allocated or filtered. Arms (GRPO: all; RAFT++: those without dynamic sampling, which is a GRPO
filter):

- uniform: every prompt gets samples_per_prompt (token-mean loss, the shipped default);
- uniform_prompt_mean: the same with the prompt-mean loss the GVM arms use (RAFT++: over accepted
  samples), so a GVM gain cannot be the loss's alone;
- dynamic: DAPO dynamic sampling (§DAPO), extra rounds of prompts until every group has a spread;
- gvm_online: §GVM.6 moving averages over a train pool the run revisits (num_train prompts);
- gvm_offline: the paper's procedure (§GVM.5): pilot 8 per prompt of a 10-step chunk, joint budget;
- gvm_step_pilot: each step pilots n_pilot per prompt, then spreads the rest by GVM (ours);
- gvm_dynamic: GVM online allocation, then dynamic sampling;
- gvm_dynamic_samples: the same, dynamic sampling filling a sample budget, not a group count (ours);
- gvm_online_groups, gvm_dynamic_samples_groups: gvm_online and gvm_dynamic_samples where a prompt never
  seen takes its difficulty level's moving averages instead of a pilot (`statistics.unseen_prompts:
  group`, ours); with a large `--num-train` no prompt is revisited and only these arms allocate;
- gvm_step_pilot_dynamic_samples: the step pilot inside dynamic sampling by samples (GRPO; ours): the
  GVM that needs no revisits at all.
Every GVM arm uses the prompt-mean loss (algorithm.aggregation=prompt_mean; RAFT++ also
drop_rejected): §GVM.2's per-prompt estimator, whose variance the allocation minimises.

Each run logs, per evaluation (greedy, `--eval-prompts` held-out prompts): the step, the samples
generated so far (every completion, pilots included) and the samples trained on. From those we
report, per arm, mean and 95% t-interval over seeds of: final accuracy at equal steps, accuracy at
equal generated samples (each curve interpolated at the uniform run's total), and samples to the
target (initial + `--target-gain`, interpolated; a run that misses it counts at its total and is
flagged). Paired differences against uniform (same seed: same data, same eval split, same initial
model) have their own intervals. Runs go to a JSONL file as they finish, so a cut-short benchmark
can still be summarised.

The last line is one JSON object: `grpo_samples_ratio`, `raft_samples_ratio` (GVM online / uniform,
samples to target, every generated sample counted), `paper_steps_ratio_grpo`,
`paper_steps_ratio_raft` (offline pilot / uniform, training steps to target, pilot not counted),
`dynamic_sampling_samples_ratio`, `gvm_dynamic_vs_dynamic` (paired: samples generated, accuracy at equal
steps and at equal samples), `gvm_grad_variance_ratio_grpo` / `_raft` / `_raft_expected` (pilot) and their
`_online` twins (worst snapshot of the saved `gvm_variance.py` run named in
`gvm_vs_uniform_summary.VARIANCE_RUNS`), the pilot keys again with a 32-sample pilot (`..._pilot32`),
and per-arm figures.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine as common_machine  # noqa: E402
from benchmarks.gvm_vs_uniform_summary import (load_runs, mean_ci, per_run_figures, pilot32_ratios,  # noqa: E402
                                               variance_ratios, versus_dynamic)

ALGORITHMS = {"grpo": "grpo", "raft": "raft++"}
GVM = ["statistics.allocation=gvm"]
# The per-prompt estimator §GVM.2 minimises: a prompt's weight must not grow with its sample count
# (benchmarks/gvm_variance.py measures why); for RAFT++ the mean over its accepted samples.
PROMPT_MEAN = {"grpo": ["algorithm.aggregation=prompt_mean"],
               "raft": ["algorithm.aggregation=prompt_mean", "algorithm.drop_rejected=true"]}
ARMS = {
    "uniform": lambda algorithm: [],
    "uniform_prompt_mean": lambda algorithm: PROMPT_MEAN[algorithm],
    "dynamic": lambda algorithm: ["algorithm.dynamic_sampling=true"],
    # λ = 0.3: gvm_variance.py finds one visit's 8 samples as noisy as a pilot; the EMA must average several.
    "gvm_online": lambda algorithm: [*GVM, "statistics.mode=online", "statistics.ema_weight=0.3",
                                     *PROMPT_MEAN[algorithm]],
    "gvm_offline": lambda algorithm: [*GVM, "statistics.mode=offline_pilot", "statistics.n_pilot=8",
                                      "statistics.chunk_steps=10", *PROMPT_MEAN[algorithm]],
    "gvm_step_pilot": lambda algorithm: [*GVM, "statistics.mode=step_pilot", "statistics.n_pilot=4",
                                         *PROMPT_MEAN[algorithm]],
    "gvm_dynamic": lambda algorithm: [*GVM, "statistics.mode=online", "statistics.ema_weight=0.3",
                                      "algorithm.dynamic_sampling=true", *PROMPT_MEAN[algorithm]],
    # The same, filling a sample budget rather than a group count: GVM's groups are unequal.
    "gvm_dynamic_samples": lambda algorithm: [*GVM, "statistics.mode=online", "statistics.ema_weight=0.3",
                                              "algorithm.dynamic_sampling=true",
                                              "algorithm.dynamic_sampling_target=samples", *PROMPT_MEAN[algorithm]],
    # A prompt never seen takes its difficulty level's moving averages instead of a pilot (ours): GVM
    # allocates from the second step on, even in a pool the run never revisits (--num-train large).
    "gvm_online_groups": lambda algorithm: [*ARMS["gvm_online"](algorithm), "statistics.unseen_prompts=group"],
    "gvm_dynamic_samples_groups": lambda algorithm: [*ARMS["gvm_dynamic_samples"](algorithm),
                                                     "statistics.unseen_prompts=group"],
    # The step pilot needs no revisits either, so it is the GVM that a pool never revisited can run; inside
    # dynamic sampling each extra round pilots its new prompts too.
    "gvm_step_pilot_dynamic_samples": lambda algorithm: [*ARMS["gvm_step_pilot"](algorithm),
                                                         "algorithm.dynamic_sampling=true",
                                                         "algorithm.dynamic_sampling_target=samples"],
}
# Run order: the arms the figures need first, every seed of them, then the rest; a benchmark
# cut short by time still has whole arms.
PRIORITY = [("grpo", "uniform"), ("grpo", "dynamic"), ("grpo", "gvm_dynamic_samples"), ("grpo", "gvm_online"),
            ("raft", "uniform"), ("raft", "uniform_prompt_mean"), ("raft", "gvm_online"),
            ("grpo", "gvm_offline"), ("raft", "gvm_offline"), ("grpo", "gvm_dynamic"), ("grpo", "uniform_prompt_mean"),
            ("grpo", "gvm_step_pilot"), ("raft", "gvm_step_pilot"), ("grpo", "gvm_online_groups"),
            ("grpo", "gvm_dynamic_samples_groups"), ("raft", "gvm_online_groups"),
            ("grpo", "gvm_step_pilot_dynamic_samples")]
DYNAMIC_COMBINED = ("gvm_dynamic", "gvm_dynamic_samples", "gvm_dynamic_samples_groups", "gvm_step_pilot_dynamic_samples")


QUICKSTART = REPO / "configs" / "quickstart.yaml"
MIN_EVAL_PROMPTS = 512
TUNED_LR = 5e-5   # uniform allocation's best on the built-in task, held-out seeds 100-104 (benchmarks/README.md)


def data_overrides(source: str, args) -> list[str]:
    """The built-in task: a train pool of `--num-train` prompts, levels 2-5, `--eval-prompts` held out.
    A user's dataset (jsonl / hf): its own train split is the pool, its eval split at most `--eval-prompts`."""
    if source == "arithmetic":
        return [f"data.arithmetic.num_train={args.num_train}", "data.arithmetic.levels=[2,3,4,5]",
                f"data.arithmetic.num_eval={args.eval_prompts}"]
    return [f"data.eval_limit={args.eval_prompts}"]


def run_overrides(algorithm: str, arm: str, seed: int, args) -> list[str]:
    return [f"seed={seed}", f"steps={args.steps}", f"eval_every={args.eval_every}",
            f"algorithm.name={ALGORITHMS[algorithm]}", f"data.prompts_per_step={args.prompts}",
            f"generator.samples_per_prompt={args.samples}", f"learner.lr={args.lr}",
            *data_overrides(args.data_source, args),
            "schedule.mode=sync", "logging.progress_bar=false", "logging.tensorboard=false",
            "guard.max_eval_drop=null", f"statistics.n_min={2 if algorithm == 'grpo' else 1}",
            f"statistics.n_max={4 * args.samples}", *ARMS[arm](algorithm), *args.overrides]


def run_once(algorithm: str, arm: str, seed: int, args) -> dict:
    """One training run in this process; returns its eval curve and sample counts."""
    from rl_service.config import load_config
    from rl_service.driver import prepare_job, run_training

    config = load_config(args.config, run_overrides(algorithm, arm, seed, args))
    job = prepare_job(config)
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        run_training(job, run_dir)
        wall = time.perf_counter() - started
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    generated = trained = 0
    counts_at = {0: (0, 0)}
    zero_adv, steps = [], 0
    for row in rows:
        if "step_seconds" in row:
            generated += int(row["completions"])
            trained += int(row["completions"] - row.get("pilot_completions", 0.0))
            counts_at[row["step"]] = (generated, trained)
            steps = row["step"]
            if "zero_variance_sample_fraction" in row:
                zero_adv.append(row["zero_variance_sample_fraction"])
    curve = [{"step": row["step"], "accuracy": row["eval_accuracy"], "generated": counts_at[row["step"]][0],
              "trained": counts_at[row["step"]][1]} for row in rows if "eval_accuracy" in row]
    return {"algorithm": algorithm, "arm": arm, "seed": seed, "steps": steps, "lr": config.learner.lr,
            "config": str(args.config), "eval_prompts": len(job.task.eval),
            "wall_s": wall, "curve": curve,
            "zero_advantage_fraction": statistics.mean(zero_adv) if zero_adv else None}


def summarise(runs: list[dict], target_gain: float) -> dict:
    result: dict = {}
    for algorithm in ALGORITHMS:
        uniform_runs = {run["seed"]: run for run in runs if run["algorithm"] == algorithm and run["arm"] == "uniform"}
        for arm in ARMS:
            mine = [run for run in runs if run["algorithm"] == algorithm and run["arm"] == arm
                    and run["seed"] in uniform_runs]
            if not mine:
                continue
            figures = [per_run_figures(run, uniform_runs[run["seed"]], target_gain) for run in mine]
            base = [per_run_figures(uniform_runs[run["seed"]], uniform_runs[run["seed"]], target_gain) for run in mine]
            entry = {key: mean_ci([figure[key] for figure in figures])
                     for key in ("final", "at_equal_samples", "samples_to_target", "steps_to_target",
                                 "trained_samples_to_target", "generated", "zero_advantage_fraction")}
            entry["reached"] = sum(figure["reached"] for figure in figures)
            entry["seeds"] = len(figures)
            for key in ("final", "at_equal_samples"):
                entry[f"{key}_minus_uniform"] = mean_ci([f[key] - b[key] for f, b in zip(figures, base)])
            result[f"{algorithm}_{arm}"] = entry
    for algorithm in ALGORITHMS:
        def ratio(arm: str, key: str) -> float | None:
            a, u = result.get(f"{algorithm}_{arm}"), result.get(f"{algorithm}_uniform")
            return a[key]["mean"] / u[key]["mean"] if a and u and a[key]["mean"] and u[key]["mean"] else None
        result[f"{algorithm}_samples_ratio"] = ratio("gvm_online", "samples_to_target")
        result[f"paper_steps_ratio_{algorithm}"] = ratio("gvm_offline", "steps_to_target")
        result[f"{algorithm}_step_pilot_samples_ratio"] = ratio("gvm_step_pilot", "samples_to_target")
        result[f"{algorithm}_offline_samples_ratio"] = ratio("gvm_offline", "samples_to_target")
        result[f"{algorithm}_groups_samples_ratio"] = ratio("gvm_online_groups", "samples_to_target")
    result |= versus_dynamic(runs, DYNAMIC_COMBINED)
    result["dynamic_sampling_samples_ratio"] = (result["grpo_dynamic"]["samples_to_target"]["mean"]
                                                / result["grpo_uniform"]["samples_to_target"]["mean"]
                                                if "grpo_dynamic" in result and "grpo_uniform" in result else None)
    return result


def print_table(result: dict) -> None:
    def show(entry: dict, scale: float = 1.0, digits: int = 3) -> str:
        if entry["mean"] is None:
            return "—"
        ci = f" ± {entry['ci95'] * scale:.{digits}f}" if entry["ci95"] is not None else ""
        return f"{entry['mean'] * scale:.{digits}f}{ci}"
    print("\n| algorithm | arm | final acc. | Δ final vs uniform | acc. at equal samples | Δ vs uniform "
          "| samples → target | steps → target | reached | zero-adv. fraction |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, entry in result.items():
        if not isinstance(entry, dict) or "final" not in entry:
            continue
        algorithm, arm = key.split("_", 1)
        print(f"| {algorithm} | {arm} | {show(entry['final'])} | {show(entry['final_minus_uniform'], 100, 1)} pt "
              f"| {show(entry['at_equal_samples'])} | {show(entry['at_equal_samples_minus_uniform'], 100, 1)} pt "
              f"| {show(entry['samples_to_target'], 1, 0)} | {show(entry['steps_to_target'], 1, 1)} "
              f"| {entry['reached']}/{entry['seeds']} | {show(entry['zero_advantage_fraction'], 1, 2)} |")
    for arm in DYNAMIC_COMBINED:
        versus = result.get(f"{arm}_vs_dynamic")
        if not versus:
            continue
        print(f"\nGRPO, {arm} vs dynamic sampling alone ({versus['seeds']} seeds, paired): samples "
              f"generated {show(versus['generated_ratio'], 1, 2)}×, final accuracy "
              f"{show(versus['final_minus_dynamic'], 100, 1)} pt, accuracy at dynamic's sample count "
              f"{show(versus['at_dynamic_samples_minus_dynamic'], 100, 1)} pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds first-seed … first-seed + seeds - 1 (held-out seeds tune a learning rate)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--config", type=Path, default=QUICKSTART,
                        help="the job every arm starts from (default: the quickstart, built-in model and task); a "
                             "job on your model and dataset runs the same arms, e.g. a GPU decision run")
    parser.add_argument("--lr", type=float, default=None,
                        help="every arm's learning rate; default: with the quickstart, uniform allocation's best on "
                             "held-out seeds 100-104 (5e-5; 2.5e-5 ties it, 1e-4 is 2-3 points worse, 2e-4 diverges; "
                             "benchmarks/README.md), else the config's learner.lr")
    parser.add_argument("--eval-prompts", type=int, default=1024)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--num-train", type=int, default=96,
                        help="built-in task only: a pool the run revisits (every 6 steps at 16 prompts a step) so "
                             "GVM online allocates from moving averages of several visits for most of the run")
    parser.add_argument("--target-gain", type=float, default=0.03)
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--workers", type=int, default=1,
                        help="runs at once, each in its own process and Ray (on 2 cores, 2 at once took 4x as long each)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=None, help="JSONL of finished runs (appended; reused on restart)")
    parser.add_argument("--summarise", type=Path, nargs="+", default=None,
                        help="only summarise these JSONL files of runs (a run found twice must match to the digit)")
    parser.add_argument("--single", nargs=3, metavar=("ALGORITHM", "ARM", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    from rl_service.config import load_config   # a config the service refuses stops here, before any run
    base = load_config(args.config, args.overrides)
    args.data_source = base.data.source
    if args.lr is None:
        args.lr = TUNED_LR if args.config.resolve() == QUICKSTART else base.learner.lr
    if args.single:
        algorithm, arm, seed = args.single
        print(json.dumps(run_once(algorithm, arm, int(seed), args)))
        return
    machine = common_machine()
    print(f"machine: {machine}", flush=True)
    if args.summarise:
        runs = load_runs(args.summarise)
    else:
        out = args.out or REPO / "benchmarks" / "results" / f"gvm_vs_uniform_{datetime.date.today()}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        done = {(r["algorithm"], r["arm"], r["seed"]) for r in
                (json.loads(line) for line in out.read_text().splitlines() if line.strip())} if out.exists() else set()
        todo = [(algorithm, arm, seed) for algorithm, arm in PRIORITY
                for seed in range(args.first_seed, args.first_seed + args.seeds)
                if algorithm in args.algorithms and arm in args.arms and (algorithm, arm, seed) not in done]
        print(f"{len(done)} runs already in {out}, {len(todo)} to go, {args.workers} at a time", flush=True)

        def launch(job: tuple[str, str, int]) -> None:
            algorithm, arm, seed = job
            passthrough = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in
                           ("config", "steps", "eval_every", "eval_prompts", "prompts", "samples", "num_train", "lr")]
            # Short: Ray's socket paths under it must stay within AF_UNIX's 107 bytes.
            tag = f"{algorithm[0]}{list(ARMS).index(arm)}s{seed}"
            env = {**os.environ, "RAY_TMPDIR": f"{os.environ.get('RAY_TMPDIR', '/tmp/ray')}_{tag}"}
            command = [sys.executable, __file__, *passthrough, *sum((["--set", o] for o in args.overrides), []),
                       "--single", algorithm, arm, str(seed)]
            for attempt in range(3):   # Ray's 30 s raylet start-up limit can pass on a loaded machine: retry
                finished = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
                if finished.returncode == 0:
                    break
                print(f"FAILED {job} (attempt {attempt + 1} of 3): {finished.stderr.strip().splitlines()[-1][:300]}",
                      flush=True)
            else:
                return
            line = finished.stdout.strip().splitlines()[-1]
            with out.open("a") as handle:
                handle.write(line + "\n")
            run = json.loads(line)
            if run["eval_prompts"] < MIN_EVAL_PROMPTS:
                print(f"warning: {run['eval_prompts']} eval prompts, fewer than {MIN_EVAL_PROMPTS}: differences of a "
                      f"few points will not be decided", flush=True)
            print(f"{algorithm:<5} {arm:<15} seed {seed}: accuracy {run['curve'][0]['accuracy']:.3f} → "
                  f"{run['curve'][-1]['accuracy']:.3f}, {run['curve'][-1]['generated']} samples, {run['wall_s']:.0f} s",
                  flush=True)

        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(launch, todo))
        runs = load_runs([out])
    result = {"machine": machine, "target_gain": args.target_gain, **summarise(runs, args.target_gain)}
    print_table(result)
    print(json.dumps({**variance_ratios(), **pilot32_ratios(), **result}))


if __name__ == "__main__":
    main()
