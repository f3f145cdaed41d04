"""BVPO vs trace-only DPO on the built-in model, online, with the power to decide (issue 17;
ALGORITHMS.md §DPO, §BVPO.3, §BVPO.6).

    .venv/bin/python benchmarks/bvpo_vs_dpo.py [--seeds 0 1 2 3 4] [--steps 80] [--eval-prompts 512]
        [--arms dpo_trace ...] [--set k=v ...]

Every (arm, seed) is a run of configs/bvpo.yaml with the same overrides, executed in this process
by :class:`InProcessRun` (the job's own learner, generator, verifier and pair selection, without
the Ray plumbing, whose start-up would cost more than the steps here); the seed fixes the data
split, the prompt order and the sampling seeds, so within a seed the arms see the same prompts in
the same steps and differ only in their loss (and in which samples their own policy drew after
step 1). Arms:

  dpo_trace            algorithm.name=dpo: trace pairs only (BVPO with α = 1), the baseline
  dpo_empty            bvpo, α = 0, per_term: the empty-trace (reasoning-off) pairs only
  bvpo_per_term        bvpo, α = 0.5, pairing per_term: each term over its own pairs (§BVPO.3)
  bvpo_same_prompts    bvpo, α = 0.5, pairing same_prompts: only prompts with a pair in both modes
  bvpo_alpha_hat       bvpo, α̂ online (§BVPO.6: K = 4 resamples per prompt on the head, EMA 0.9), per_term
  bvpo_off16           bvpo_per_term with 16 reasoning-off samples per prompt instead of 8: configs/bvpo.yaml
  bvpo_off24, bvpo_off32 (opt-in) bvpo_per_term with 24 / 32 reasoning-off samples per prompt
  bvpo_alpha_hat_off16 (opt-in) bvpo_alpha_hat with 16 reasoning-off samples

Per arm, over seeds: greedy verifier accuracy on the eval split with reasoning on and off after
training (mean and 95% t-interval), its change from the step-0 eval, and the paired difference
to dpo_trace per seed (mean and 95% t-interval: the same eval prompts and start, so tighter);
the variance over steps of the pre-clip gradient norm and its coefficient of variation (std/mean:
scale-free, since α = 0.5 also halves the norm), pairs trained per mode, mean α, seconds.
The machine comes first; the last line is ONE JSON object: bvpo_minus_dpo_on / _off (points,
BVPO as configs/bvpo.yaml ships it, α = 0.5, per_term, 16 reasoning-off samples, minus dpo_trace), grad_norm_variance_ratio, pairs_ratio
(trace pairs BVPO / DPO: does BVPO drop pairs DPO trains?), pairs_ratio_all_modes, and every arm.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine  # noqa: E402
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# The reasoning-off budget is pinned per arm (configs/bvpo.yaml ships 16, measured by bvpo_off16).
ARMS = {
    "dpo_trace": ["algorithm.name=dpo", "preference.alpha=1.0", "preference.off_samples_per_prompt=null"],
    "dpo_empty": ["algorithm.name=bvpo", "preference.alpha=0.0", "preference.pairing=per_term",
                  "preference.off_samples_per_prompt=8"],
    "bvpo_per_term": ["algorithm.name=bvpo", "preference.alpha=0.5", "preference.pairing=per_term",
                      "preference.off_samples_per_prompt=8"],
    "bvpo_same_prompts": ["algorithm.name=bvpo", "preference.alpha=0.5", "preference.pairing=same_prompts",
                          "preference.off_samples_per_prompt=8"],
    "bvpo_alpha_hat": ["algorithm.name=bvpo", "preference.alpha_mode=online", "preference.alpha_resamples=4",
                       "preference.alpha_ema=0.9", "preference.pairing=per_term", "preference.off_samples_per_prompt=8"],
    # Twice the reasoning-off samples, where the model rarely answers without a trace: what bvpo.yaml ships.
    "bvpo_off16": ["algorithm.name=bvpo", "preference.alpha=0.5", "preference.pairing=per_term",
                   "preference.off_samples_per_prompt=16"],
    # Opt-in: larger reasoning-off budgets (the off-mode pair yield is the bottleneck of L_empty).
    "bvpo_off24": ["algorithm.name=bvpo", "preference.alpha=0.5", "preference.pairing=per_term",
                   "preference.off_samples_per_prompt=24"],
    "bvpo_off32": ["algorithm.name=bvpo", "preference.alpha=0.5", "preference.pairing=per_term",
                   "preference.off_samples_per_prompt=32"],
    # Opt-in: the shipped budget split with the online α̂ instead of α = 0.5.
    "bvpo_alpha_hat_off16": ["algorithm.name=bvpo", "preference.alpha_mode=online", "preference.alpha_resamples=4",
                             "preference.alpha_ema=0.9", "preference.pairing=per_term",
                             "preference.off_samples_per_prompt=16"],
}
DEFAULT_ARMS = ["dpo_trace", "dpo_empty", "bvpo_per_term", "bvpo_same_prompts", "bvpo_alpha_hat", "bvpo_off16"]
MODES = ("reasoning_on", "reasoning_off")
# Two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..30 (standard table values).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def shipped_arm(arms: list[str]) -> str | None:
    """The arm that trains as configs/bvpo.yaml ships (α, α mode, pairing, reasoning-off budget):
    the BVPO the issue's bar is about, and the JSON line's bvpo_minus_dpo_*."""
    from rl_service.config import load_config

    fields = ("alpha", "alpha_mode", "pairing", "off_samples_per_prompt")
    shipped = load_config(REPO / "configs" / "bvpo.yaml").preference
    for arm in arms:
        preference = load_config(REPO / "configs" / "bvpo.yaml", ARMS[arm]).preference
        if preference.alpha_mode == "fixed" and all(getattr(preference, f) == getattr(shipped, f) for f in fields):
            return arm
    return None


class InProcessRun:
    """One DPO / BVPO run of `config` in this process: the job's own pieces — prepare_preference_job
    (config checks, task split), PromptSampler, the `torch` generation engine, the verifier,
    select_pairs / pairs_from_rollout and the PreferenceLearner (a DeepSpeed engine, world of one) —
    in the order of `rl_service/driver/preference_loop.py`'s online step, without Ray: on this shared 2-core
    machine a Ray run spends ~100 s starting Ray and its four actors, more than its 40 steps take.
    The generator gets the learner's weights after every update (as `publish` does)."""

    def __init__(self, config):
        from rl_service.data.sampler import PromptSampler
        from rl_service.generation.torch_engine import TorchGenerationEngine
        from rl_service.driver.preference_loop import prepare_preference_job
        from rl_service.rollout import SamplingParams
        from rl_service.tasks import PromptTokenizer
        from rl_service.training.preference_learner import PreferenceLearner

        self.config = config
        job = prepare_preference_job(config)
        self.task = job.task
        self.tokens = {split: {thinking: PromptTokenizer(job.tokenizer, thinking) for thinking in (True, False)}
                       for split in ("train", "eval")}
        self.sampler = PromptSampler(len(self.task.train), config.data.prompts_per_step, config.seed)
        self.learner = PreferenceLearner(config)
        self.engine = TorchGenerationEngine(config.model.path, config.model.dtype, config.model.trust_remote_code)
        generator = config.generator
        self.sampling = SamplingParams(generator.temperature, generator.top_p, generator.max_new_tokens)
        self.greedy = SamplingParams(0.0, 1.0, generator.max_new_tokens)
        self.next_pair_id = 0

    def _generate(self, records, split: str, modes, samples: dict, sampling, seed: int):
        from rl_service.rewards.verifiers import score_batch
        from rl_service.rollout import GenerationRequest

        requests = [GenerationRequest(offset * len(records) + index, record.prompt_id,
                                      self.tokens[split][thinking](record), samples[thinking])
                    for offset, thinking in enumerate(modes) for index, record in enumerate(records)]
        rollout = self.engine.generate(requests, sampling, seed)
        gold = [records[index % len(records)].answer for index in rollout.request_index]
        return rollout, score_batch(rollout.completion_texts, gold, self.config.reward.verifier)

    def evaluate(self, step: int) -> dict[str, float]:
        from rl_service.rollout import step_seed

        rollout, rewards = self._generate(self.task.eval, "eval", (True, False), {True: 1, False: 1}, self.greedy,
                                          step_seed(self.config.seed, step, 1))
        mode = np.asarray(rollout.request_index) // len(self.task.eval)
        rewards = np.asarray(rewards, dtype=np.float64)
        return {f"eval_accuracy_{label}": float(rewards[mode == k].mean()) for k, label in enumerate(MODES)}

    def train_step(self, step: int) -> dict[str, float]:
        from rl_service.data.preferences import pairs_from_rollout, select_pairs
        from rl_service.rollout import step_seed

        config, preference = self.config, self.config.preference
        with_empty = config.algorithm.name == "bvpo"
        records = [self.task.train[index] for index in self.sampler.next_batch()]
        per_prompt = config.generator.samples_per_prompt
        samples = {True: per_prompt, False: preference.off_samples_per_prompt or per_prompt}
        rollout, rewards = self._generate(records, "train", (True, False) if with_empty else (True,), samples,
                                          self.sampling, step_seed(config.seed, step, 0))
        resamples = preference.alpha_resamples if preference.alpha_mode == "online" else 0
        selection = select_pairs(rewards, rollout.request_index, len(records), with_empty, resamples,
                                 step_seed(config.seed, step, 3), preference.pairing)
        metrics = self.learner.train_step(pairs_from_rollout(rollout, selection, self.next_pair_id))
        self.next_pair_id += len(selection.prompts)
        # What a publication carries (under LoRA the merged weights); a tied head follows its embedding.
        missing, unexpected = self.engine.model.load_state_dict(dict(self.learner.published_weights()), strict=False)
        assert not unexpected and all(name in self.engine.model._tied_weights_keys for name in missing), (missing, unexpected)
        return {**selection.counts, **metrics}


_INITIAL_EVALS: dict[int, dict[str, float]] = {}


def run_one(arm: str, seed: int, steps: int, overrides: list[str]) -> dict:
    import torch

    from rl_service.config import load_config

    config = load_config(REPO / "configs" / "bvpo.yaml", [
        f"seed={seed}", f"steps={steps}", "eval_every=0", "logging.progress_bar=false", "logging.tensorboard=false",
        "guard.max_eval_drop=null", *overrides, *ARMS[arm]])
    torch.manual_seed(seed)
    started = time.perf_counter()
    run = InProcessRun(config)
    # Every arm of a seed starts from the same model on the same eval split, greedy: evaluate it once.
    if seed not in _INITIAL_EVALS:
        _INITIAL_EVALS[seed] = run.evaluate(0)
    initial = _INITIAL_EVALS[seed]
    rows = [run.train_step(step) for step in range(1, steps + 1)]
    final = run.evaluate(steps)
    trained = [row for row in rows if row.get("grad_norm") is not None]
    grad_norms = np.array([row["grad_norm"] for row in trained], dtype=np.float64)
    result = {"arm": arm, "seed": seed, "seconds": time.perf_counter() - started,
              "grad_norm_variance": float(np.var(grad_norms, ddof=1)) if len(grad_norms) > 1 else float("nan"),
              "grad_norm_mean": float(grad_norms.mean()) if len(grad_norms) else float("nan"),
              "alpha_mean": float(np.mean([row["alpha"] for row in trained])) if trained else float("nan"),
              "trained_steps": len(trained),
              "pairs": int(sum(row["pairs"] for row in trained)),
              "trace_pairs": int(sum(row["trace_pairs"] for row in trained)),
              "empty_pairs": int(sum(row["empty_pairs"] for row in trained)),
              "trace_pair_yield": float(np.mean([row["trace_pair_yield"] for row in rows])),
              "empty_pair_yield": float(np.mean([row.get("empty_pair_yield", np.nan) for row in rows])),
              "nan_skipped_steps": int(rows[-1]["nan_skipped_steps"])}
    result["grad_norm_cv"] = float(np.sqrt(result["grad_norm_variance"]) / result["grad_norm_mean"])
    result["all_pairs"] = result["trace_pairs"] + result["empty_pairs"]
    for mode in MODES:
        result[f"accuracy_{mode}"] = final[f"eval_accuracy_{mode}"]
        result[f"initial_accuracy_{mode}"] = initial[f"eval_accuracy_{mode}"]
        result[f"accuracy_change_{mode}"] = final[f"eval_accuracy_{mode}"] - initial[f"eval_accuracy_{mode}"]
    return result


def interval(values) -> dict:
    """Mean and 95% Student-t interval over seeds (half-width 0 with one value)."""
    array = np.asarray(values, dtype=np.float64)
    mean = float(array.mean())
    if len(array) < 2:
        return {"mean": mean, "low": mean, "high": mean, "n": len(array)}
    quantile = T_975[len(array) - 2] if len(array) - 1 <= len(T_975) else 1.96
    half = quantile * float(array.std(ddof=1)) / np.sqrt(len(array))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(array)}


def _fmt(stat: dict, scale: float = 1.0, digits: int = 1) -> str:
    return f"{stat['mean'] * scale:.{digits}f} [{stat['low'] * scale:.{digits}f}, {stat['high'] * scale:.{digits}f}]"


def summarise(runs: list[dict], arms: list[str], seeds: list[int]) -> dict:
    columns = ("accuracy_reasoning_on", "accuracy_reasoning_off", "accuracy_change_reasoning_on",
               "accuracy_change_reasoning_off", "grad_norm_variance", "grad_norm_cv", "grad_norm_mean", "alpha_mean",
               "pairs", "trace_pairs", "empty_pairs", "all_pairs", "trace_pair_yield", "empty_pair_yield", "seconds")
    by = {(run["arm"], run["seed"]): run for run in runs}
    table = {}
    for arm in arms:
        mine = [by[(arm, seed)] for seed in seeds if (arm, seed) in by]
        table[arm] = {column: interval([run[column] for run in mine]) for column in columns}
        if arm != "dpo_trace":
            for mode in MODES:   # paired by seed: same eval prompts, same start, same prompt order
                differences = [by[(arm, seed)][f"accuracy_{mode}"] - by[("dpo_trace", seed)][f"accuracy_{mode}"]
                               for seed in seeds if (arm, seed) in by and ("dpo_trace", seed) in by]
                if differences:
                    table[arm][f"minus_dpo_{mode}"] = interval(differences)
    return table


def print_tables(table: dict) -> None:
    print("\naccuracy after training, % (mean [95% t-interval over seeds]); paired difference to dpo_trace, points")
    header = ("arm", "acc on", "acc off", "Δ on (from step 0)", "Δ off (from step 0)", "− dpo_trace on", "− dpo_trace off")
    print(f"{header[0]:<19}" + "".join(f"{name:>24}" for name in header[1:]))
    for arm, stats in table.items():
        cells = [_fmt(stats["accuracy_reasoning_on"], 100), _fmt(stats["accuracy_reasoning_off"], 100),
                 _fmt(stats["accuracy_change_reasoning_on"], 100), _fmt(stats["accuracy_change_reasoning_off"], 100),
                 _fmt(stats["minus_dpo_reasoning_on"], 100) if "minus_dpo_reasoning_on" in stats else "—",
                 _fmt(stats["minus_dpo_reasoning_off"], 100) if "minus_dpo_reasoning_off" in stats else "—"]
        print(f"{arm:<19}" + "".join(f"{cell:>24}" for cell in cells))
    print("\ngradient norm over steps and pairs trained per run (mean [95% t-interval over seeds])")
    header = ("arm", "gnorm variance", "gnorm CV", "gnorm mean", "α mean", "trace pairs", "empty pairs",
              "yield on/off", "s/run")
    print(f"{header[0]:<19}" + "".join(f"{name:>22}" for name in header[1:]))
    for arm, stats in table.items():
        cells = [_fmt(stats["grad_norm_variance"], 1, 4), _fmt(stats["grad_norm_cv"], 1, 3), _fmt(stats["grad_norm_mean"], 1, 3),
                 f"{stats['alpha_mean']['mean']:.3f}", _fmt(stats["trace_pairs"], 1, 0), _fmt(stats["empty_pairs"], 1, 0),
                 f"{stats['trace_pair_yield']['mean']:.2f}/{stats['empty_pair_yield']['mean']:.2f}",
                 f"{stats['seconds']['mean']:.0f}"]
        print(f"{arm:<19}" + "".join(f"{cell:>22}" for cell in cells))


def previous_runs(paths: list[Path], settings: dict) -> dict:
    """(arm, seed) -> run from earlier outputs (their last line) made with exactly `settings`."""
    found = {}
    for path in paths:
        output = json.loads(path.read_text().strip().splitlines()[-1])
        differs = {key: output.get(key) for key, value in settings.items() if output.get(key) != value}
        if differs:
            raise SystemExit(f"--previous {path}: other settings ({differs}), not comparable")
        # null in the JSON line is a NaN statistic (a mode with no pairs): back to NaN for the summary.
        found.update({(run["arm"], run["seed"]): {key: float("nan") if value is None else value
                                                  for key, value in run.items()} for run in output["runs"]})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--eval-prompts", type=int, default=512)
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra config override for every run, e.g. learner.lr=5e-5")
    parser.add_argument("--previous", nargs="+", type=Path, default=[],
                        help="outputs of earlier runs with the same settings: their (arm, seed) runs are reused, "
                             "after the first reused one is rerun here and must reproduce bit for bit")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if "dpo_trace" not in args.arms:
        parser.error("--arms must include dpo_trace, the baseline every difference is taken to")
    overrides = ["data.arithmetic.levels=[1,2,3]", f"data.arithmetic.num_eval={args.eval_prompts}",
                 "data.prompts_per_step=12", "generator.samples_per_prompt=8", "generator.max_new_tokens=48",
                 "generator.backend=torch", "learner.zero_stage=0", *args.overrides]
    print(f"machine: {machine()}", flush=True)
    print(f"{len(args.seeds)} seeds × {args.steps} steps, {args.eval_prompts} eval prompts per mode, overrides: "
          f"{' '.join(overrides)}", flush=True)

    started = time.perf_counter()
    previous = previous_runs(args.previous, {"steps": args.steps, "eval_prompts": args.eval_prompts, "overrides": overrides})
    runs, checked = [], False
    for seed in args.seeds:   # seed-major: an interrupted run still has whole seeds of every arm
        for arm in args.arms:
            if (arm, seed) in previous and checked:
                runs.append(previous[arm, seed])
                continue
            runs.append(run_one(arm, seed, args.steps, overrides))
            run = runs[-1]
            if (arm, seed) in previous:   # the reproduction check: same settings, same code path, same numbers
                # Compared as the JSON line holds them (NaN written as null).
                want = {k: v for k, v in _finite_or_null(previous[arm, seed]).items() if k != "seconds"}
                run = {k: v for k, v in _finite_or_null(run).items()}
                if {k: v for k, v in run.items() if k != "seconds"} != want:
                    differs = {k: (want.get(k), run.get(k)) for k in sorted(set(want) | set(run))
                               if k != "seconds" and want.get(k) != run.get(k)}
                    raise SystemExit(f"{arm} seed {seed} does not reproduce the --previous run (previous, now: "
                                     f"{differs}): not merging")
                checked = True
                print(f"  {arm} seed {seed} reproduces the --previous run bit for bit: reusing its other runs", flush=True)
            print(f"  {arm:<18} seed {seed}: on {run['accuracy_reasoning_on']:.3f} (from {run['initial_accuracy_reasoning_on']:.3f}) "
                  f"off {run['accuracy_reasoning_off']:.3f} (from {run['initial_accuracy_reasoning_off']:.3f}) "
                  f"gnorm var {run['grad_norm_variance']:.4f} pairs {run['trace_pairs']}+{run['empty_pairs']} "
                  f"({run['seconds']:.0f} s)", flush=True)

    table = summarise(runs, args.arms, args.seeds)
    print_tables(table)
    default_arm = shipped_arm(args.arms)
    result = {"machine": machine(), "seeds": args.seeds, "steps": args.steps, "eval_prompts": args.eval_prompts,
              "overrides": overrides, "wall_seconds": time.perf_counter() - started, "default_arm": default_arm}
    if default_arm in table:
        bvpo, dpo = table[default_arm], table["dpo_trace"]
        result.update({
            "bvpo_minus_dpo_on": 100 * bvpo["minus_dpo_reasoning_on"]["mean"],
            "bvpo_minus_dpo_off": 100 * bvpo["minus_dpo_reasoning_off"]["mean"],
            "bvpo_minus_dpo_on_interval": [100 * bvpo["minus_dpo_reasoning_on"][k] for k in ("low", "high")],
            "bvpo_minus_dpo_off_interval": [100 * bvpo["minus_dpo_reasoning_off"][k] for k in ("low", "high")],
            "grad_norm_variance_ratio": bvpo["grad_norm_variance"]["mean"] / dpo["grad_norm_variance"]["mean"],
            "grad_norm_cv_ratio": bvpo["grad_norm_cv"]["mean"] / dpo["grad_norm_cv"]["mean"],
            "pairs_ratio": bvpo["trace_pairs"]["mean"] / dpo["trace_pairs"]["mean"],
            "pairs_ratio_all_modes": bvpo["all_pairs"]["mean"] / dpo["all_pairs"]["mean"],
        })
    result["arms"] = table
    result["runs"] = runs
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
