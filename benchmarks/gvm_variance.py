"""Does GVM's allocation lower the variance of the learner's policy gradient? (issue #21 item 3, ALGORITHMS.md §GVM)

    .venv/bin/python benchmarks/gvm_variance.py [--draws 32] [--prompts 16] [--pool 32] [--pool-draws 2000]
        [--train-seeds 0 1 ...]

Frozen snapshots of the built-in model: the shipped one, and one after 40 uniform GRPO steps of the
quickstart job per `--train-seeds` seed (32 prompts × 8, lr 1e-4; trained here by the service's sync
step run in process, see `trained_snapshot`; cached under benchmarks/results/gvm_variance_snapshot/,
not committed). A fixed batch of B held-out prompts (levels 1-5) and a fixed budget N = 8·B.

Real draws (the measurement the issue asks for): R independent draws under (i) uniform allocation,
(ii) GVM on a fresh pilot of 8 samples per prompt each draw (§GVM.5's statistics: p̂, Ĝ = the §GVM.1
embedding-gradient norm, as the learner computes it), (iii) GVM from the online moving averages
(§GVM.6, `PromptStatistics` + the online policy) fed by every earlier draw of the same prompts, (iv) GVM
for prompts never seen from their difficulty level's moving averages (`statistics.unseen_prompts: group`,
`GroupStatistics`), fed the same way.
Generation: the project's torch engine, in process, at the training temperature. Gradient: the
learner's own `train_step` (one rank, ZeRO 0) with only `engine.step` replaced by a copy of the
gradient, for GRPO and for RAFT++ on the same samples, with the loss the shipped GVM configs train with
(`--loss shipped`, the default: prompt mean, RAFT++ over accepted samples) or the quickstart's token
mean (`--loss token_mean`). Reported: tr Cov of the flattened 1.1M-entry gradient, GVM over uniform
with a bootstrap 95% interval, ‖E g‖² per allocation (a token mean weights a prompt by its sample
count, so the allocations estimate different expectations), the relative shift of E g, and the
fraction of samples with advantage 0. With the shipped loss, RAFT++ is also measured with
`accepted_normaliser: expected` (§GVM.2's estimator: a prompt's accepted samples over n_i·p̄_i), uniform
and GVM divided by the same p̄ (the draw's pilot, or the online statistics as the learner gets them), so
both estimate the same gradient. GVM settings: configs/gvm_grpo.yaml's statistics.

Pool engine (diagnostics): M samples per prompt, their per-sample gradients and Gram matrix; thousands
of draws resampled from the pool under every allocation rule and five estimators (the learner's token
mean for GRPO/RAFT++, a prompt mean for each, and §GVM.2's per-prompt mean over accepted samples), each
draw's gradient an exact quadratic form. Checked against the learner's gradient on one draw, and
against the real draws' uniform trace. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine  # noqa: E402
from benchmarks.gvm_variance_math import (ESTIMATORS, bootstrap_ratio_interval, estimator_coefficients,  # noqa: E402
                                          gram_covariance_trace, gram_mean_sq_norm, gvm2_objective)
from benchmarks.gvm_variance_pool import (GroupAllocator, OnlineAllocator, build_pool, mean_shift,  # noqa: E402
                                          pilot_allocation, simulate)
from benchmarks.gvm_variance_probe import LOSSES, FrozenPolicy, job_config, subset  # noqa: E402
from rl_service.algorithms.gvm import gvm_allocation, uniform_allocation  # noqa: E402
from rl_service.config import load_config  # noqa: E402
from rl_service.generation.torch_engine import TorchGenerationEngine  # noqa: E402
from rl_service.rewards.verifiers import score_batch  # noqa: E402
from rl_service.rollout import SamplingParams  # noqa: E402
from rl_service.tasks import PromptTokenizer, load_task  # noqa: E402

SNAPSHOT_DIR = REPO / "benchmarks" / "results" / "gvm_variance_snapshot"
REAL_ARMS = ("uniform", "gvm_pilot", "gvm_online", "gvm_group")
ARM_SUFFIX = {"gvm_pilot": "", "gvm_online": "_online", "gvm_group": "_group"}   # of the JSON keys
# RAFT++ with accepted_normaliser 'expected' (§GVM.2's estimator) divides by n_i·p̄_i: uniform and GVM
# use the same p̄ (the pilot's, or the online averages'), so the two estimate the same gradient.
EXPECTED_ARMS = {"raft_expected_pilot": ("uniform", "gvm_pilot"), "raft_expected_online": ("uniform", "gvm_online")}


def trained_snapshot(steps: int, seed: int = 0) -> Path:
    """The model after `steps` uniform GRPO steps of the quickstart job (`seed`: its prompt order,
    sampling and init), made once and cached.

    The sync-mode step of the service, in this process: the project's prompt sampler, torch generator,
    verifier and `PolicyLearner.train_step` (one rank, ZeRO 0: on one rank ZeRO 1 is the same update),
    the new weights loaded into the generator after every step. (`run_training` under Ray does the same
    with four processes; on the shared 2-core machine its actors ran at 100-200 s a step.)"""
    settings = {"config": "configs/quickstart.yaml", "steps": steps, "loop": "in-process sync", "seed": seed}
    directory = SNAPSHOT_DIR / f"seed{seed}"
    directory.mkdir(parents=True, exist_ok=True)
    marker, model = directory / "snapshot.json", directory / "model"
    if marker.is_file() and json.loads(marker.read_text()) == settings and (model / "model.safetensors").is_file():
        return model
    from rl_service.data.sampler import PromptSampler
    from rl_service.rollout import GenerationRequest, step_seed
    from rl_service.training.policy_learner import PolicyLearner

    started = time.perf_counter()
    config = job_config("builtin", "grpo", [f"seed={seed}"])
    learner = PolicyLearner(config)
    policy_engine = TorchGenerationEngine("builtin", config.model.dtype, config.model.trust_remote_code)
    task = load_task(config)
    tokenize = PromptTokenizer(learner.tokenizer, config.model.thinking)
    sampler = PromptSampler(len(task.train), config.data.prompts_per_step, config.seed)
    generator = config.generator
    sampling = SamplingParams(generator.temperature, generator.top_p, generator.max_new_tokens)
    accuracy = []
    for step in range(steps):
        records = [task.train[index] for index in sampler.next_batch()]
        requests = [GenerationRequest(k, record.prompt_id, tokenize(record), generator.samples_per_prompt)
                    for k, record in enumerate(records)]
        rollout = policy_engine.generate(requests, sampling, step_seed(config.seed, step, 0))
        rewards = score_batch(rollout.completion_texts, [records[k].answer for k in rollout.request_index], "integer")
        learner.train_step(rollout, rewards)
        policy_engine.load_weights(learner.flat_weights(step + 1))
        accuracy.append(float(np.mean(rewards)))
    shutil.rmtree(model, ignore_errors=True)
    learner.save_pretrained(model)
    marker.write_text(json.dumps(settings))
    print(f"trained snapshot: {steps} GRPO steps in {time.perf_counter() - started:.0f} s, train accuracy "
          f"{np.mean(accuracy[:5]):.3f} (first 5 steps) -> {np.mean(accuracy[-5:]):.3f} (last 5)", flush=True)
    return model


def gram_of(draws: np.ndarray) -> np.ndarray:
    matrix = torch.from_numpy(draws)
    return (matrix @ matrix.T).double().numpy()


def real_draws(policy: FrozenPolicy, settings, args, seed: int) -> dict:
    """R draws per arm through the generator and the learner; per (arm, algorithm): Gram of the draws,
    mean gradient, zero-advantage fraction and the allocations."""
    prompts, budget, draws = policy.num_prompts, policy.num_prompts * args.samples, args.draws
    keys = [(arm, alg) for arm in REAL_ARMS for alg in ("grpo", "raft")]
    if policy.raft_expected is not None:
        keys += [(arm, alg) for alg, arms in EXPECTED_ARMS.items() for arm in arms]
    grads = {key: np.empty((draws, policy.grpo.size), dtype=np.float32) for key in keys}
    zero = {key: [] for key in grads}
    allocations = {arm: [] for arm in REAL_ARMS}
    online = OnlineAllocator(settings, policy.prompt_ids, budget)
    by_group = GroupAllocator(settings, policy.prompt_ids, policy.groups, budget)
    for warm in range(args.warmup):   # the moving averages start from earlier draws (not measured)
        statistics = policy.prompt_statistics(policy.draw(online.allocate(), seed + 7 * warm + 5))
        online.observe(*statistics)
        by_group.observe(*statistics)
    for r in range(draws):
        # This draw's statistics, fixed before any of its arms samples: the pilot (gvm_pilot's seed) and
        # the online averages (updated after gvm_online's draw).
        pilot_stats = policy.prompt_statistics(policy.draw([args.pilot] * prompts, seed + 1000 * (r + 1) + 11))
        estimates = {"raft_expected_pilot": pilot_stats[0] / pilot_stats[1],
                     "raft_expected_online": online.acceptance_estimates()}
        for a, arm in enumerate(REAL_ARMS):
            started = time.perf_counter()
            base = seed + 1000 * (r + 1) + 10 * a
            if arm == "uniform":
                counts = uniform_allocation(prompts, budget)
            elif arm == "gvm_pilot":
                counts = pilot_allocation(*pilot_stats, budget, settings)
            elif arm == "gvm_group":
                counts = by_group.allocate()
            else:
                counts = online.allocate()
            result = policy.draw(counts, base)
            allocations[arm].append(np.asarray(counts).tolist())
            probes = [("grpo", policy.grpo, None), ("raft", policy.raft, None)]
            probes += [(alg, policy.raft_expected, estimates[alg]) for alg, arms in EXPECTED_ARMS.items()
                       if (arm, alg) in grads]
            for alg, probe, estimate in probes:
                gradient, metrics = probe(result.rollout, result.rewards.tolist(), estimate)
                grads[arm, alg][r] = gradient.numpy()
                zero[arm, alg].append(metrics["zero_variance_sample_fraction"] if alg == "grpo"
                                      else float((result.rewards != 1).mean()))
            if arm in ("gvm_online", "gvm_group"):
                (online if arm == "gvm_online" else by_group).observe(*policy.prompt_statistics(result))
            if r == 0:
                print(f"  one draw, {arm}: {time.perf_counter() - started:.2f} s (counts {list(map(int, counts))})", flush=True)
        if (r + 1) % 8 == 0:
            print(f"  real draws {r + 1}/{draws}", flush=True)
    out = {}
    for key, matrix in grads.items():
        out[key] = {"gram": gram_of(matrix), "mean": matrix.astype(np.float64).mean(axis=0),
                    "zero_advantage": float(np.mean(zero[key])), "allocations": allocations[key[0]]}
    return out


def summarise_real(real: dict, draws: int) -> dict:
    table = {}
    for alg, arms in {"grpo": REAL_ARMS, "raft": REAL_ARMS, **EXPECTED_ARMS}.items():
        if ("uniform", alg) not in real:
            continue
        uniform = real["uniform", alg]
        u_trace, u_mean_sq = gram_covariance_trace(uniform["gram"]), gram_mean_sq_norm(uniform["gram"])
        for arm in (arm for arm in arms if (arm, alg) in real):
            entry = real[arm, alg]
            trace, mean_sq = gram_covariance_trace(entry["gram"]), gram_mean_sq_norm(entry["gram"])
            low, high = bootstrap_ratio_interval(entry["gram"], uniform["gram"], reps=1000, statistic=gram_covariance_trace)
            shift_sq = float(np.sum((entry["mean"] - uniform["mean"]) ** 2)) - (trace + u_trace) / draws
            counts = np.asarray(entry["allocations"])
            table[f"{arm}/{alg}"] = {
                "trace_cov": trace, "ratio_vs_uniform": trace / u_trace, "ratio_ci95": [low, high],
                "mean_sq_norm": mean_sq, "mean_sq_ratio_vs_uniform": mean_sq / u_mean_sq,
                "relative_noise_ratio": (trace / max(mean_sq, 1e-300)) / (u_trace / max(u_mean_sq, 1e-300)),
                "mean_shift_vs_uniform": float(np.sqrt(max(shift_sq, 0.0) / max(u_mean_sq, 1e-300))),
                # E‖g − E g_uniform‖² over uniform's tr Cov: variance plus the squared shift of the expectation
                "mse_vs_uniform_mean_ratio": (trace + max(shift_sq, 0.0)) / u_trace,
                "zero_advantage_fraction": entry["zero_advantage"],
                "allocation_min_median_max": [float(counts.min(axis=1).mean()), float(np.median(counts, axis=1).mean()),
                                              float(counts.max(axis=1).mean())]}
    return table


def pool_arms(pool, settings, raft_settings, args, seed: int) -> dict:
    """Every allocation rule on the pool, measured with every estimator (ESTIMATORS)."""
    prompts, budget = pool.num_prompts, pool.num_prompts * args.samples
    p, g_emb, g_full = pool.oracle()
    g_all, spread = np.nan_to_num(pool.per_prompt(pool.full_norm)), ((p > 0) & (p < 1)).astype(float)
    fixed = {
        "uniform": np.asarray(uniform_allocation(prompts, budget)),
        "oracle_emb_G": gvm_allocation(p, g_emb, budget, alpha=settings.alpha, beta=settings.beta,
                                       n_min=settings.n_min, n_max=settings.n_max),
        "oracle_full_G": gvm_allocation(p, g_full, budget, alpha=settings.alpha, beta=settings.beta,
                                        n_min=settings.n_min, n_max=settings.n_max),
        "oracle_full_G_alpha0": gvm_allocation(p, g_full, budget, alpha=0.0, n_min=settings.n_min, n_max=settings.n_max),
        "oracle_gvm2_unbounded": gvm_allocation(p, g_full, budget, alpha=0.0),             # n ∝ G/√p, §GVM.2
        "oracle_G_sqrt_p": gvm_allocation(p, g_full * p, budget, alpha=0.0, n_min=settings.n_min,
                                          n_max=settings.n_max),                         # n ∝ G·√p
        # n ∝ G over all samples, on prompts whose group can have a spread (0 < p < 1): GRPO's analogue
        "oracle_G_on_spread": gvm_allocation(p, g_all * np.sqrt(p) * spread, budget, alpha=0.0, n_min=settings.n_min,
                                             n_max=settings.n_max),
    }

    def pilot_rule(rule_settings):
        def allocate(rng):
            picked = np.concatenate([rng.choice(m, size=args.pilot, replace=True) for m in pool.members])
            groups = pool.groups[picked]
            accepted = np.bincount(groups, weights=(pool.rewards[picked] == 1).astype(float), minlength=prompts)
            emb = pool.emb_norm[picked]
            finite = np.isfinite(emb)
            number = np.bincount(groups[finite], minlength=prompts)
            grad = np.bincount(groups[finite], weights=emb[finite], minlength=prompts) / np.maximum(number, 1)
            return pilot_allocation(accepted, np.full(prompts, float(args.pilot)), np.where(number > 0, grad, np.nan),
                                    budget, rule_settings)
        return allocate

    rng = np.random.default_rng(seed)
    arms = {name: simulate(pool, lambda _rng, c=counts: c, args.pool_draws, rng) for name, counts in fixed.items()}
    arms["gvm_pilot"] = simulate(pool, pilot_rule(settings), args.pool_draws, rng)
    arms["gvm_pilot_raft_cfg"] = simulate(pool, pilot_rule(raft_settings), args.pool_draws, rng)
    online = OnlineAllocator(settings, np.arange(prompts), budget)
    simulate(pool, lambda _rng: online.allocate(), args.warmup, rng, observe=online.observe)   # warm-up
    arms["gvm_online"] = simulate(pool, lambda _rng: online.allocate(), args.pool_draws, rng, observe=online.observe)
    summary = {"oracle": {"p": p.round(3).tolist(), "G_embedding": g_emb.round(2).tolist(), "G_full": g_full.round(2).tolist(),
                          "corr_G_embedding_G_full": float(np.corrcoef(g_emb[p > 0], g_full[p > 0])[0, 1]) if (p > 0).sum() > 2 else None},
               "allocations": {name: counts.tolist() for name, counts in fixed.items()}, "arms": {}}
    uniform_gvm2 = gvm2_objective(fixed["uniform"], p, g_full)
    weights = np.where(p > 0, g_full / np.sqrt(np.where(p > 0, p, 1.0)), 0.0)
    summary["gvm2_predicted_ratio_real_valued_optimum"] = gvm2_objective(budget * weights / weights.sum(), p, g_full) / uniform_gvm2
    for name, arm in arms.items():
        entry = {"zero_advantage": arm.zero_advantage, "counts_mean": arm.counts_mean.round(2).tolist()}
        if name in fixed:
            entry["gvm2_predicted_ratio"] = gvm2_objective(fixed[name], p, g_full) / uniform_gvm2
        for kind in ESTIMATORS:
            reference = arms["uniform"]
            low, high = bootstrap_ratio_interval(arm.deviations[kind], reference.deviations[kind], reps=500)
            shift, cosine = mean_shift(pool, arm, reference, kind, args.pool_draws)
            entry[kind] = {"trace_cov": arm.trace[kind], "ratio_vs_uniform": arm.trace[kind] / reference.trace[kind],
                           "ratio_ci95": [low, high], "mean_sq_norm": arm.mean_sq[kind],
                           "relative_noise_ratio": (arm.trace[kind] / max(arm.mean_sq[kind], 1e-300))
                           / (reference.trace[kind] / max(reference.mean_sq[kind], 1e-300)),
                           "mean_shift_vs_uniform": shift, "mean_cosine_vs_uniform": cosine,
                           "mse_vs_uniform_mean_ratio": (arm.trace[kind] + shift**2 * reference.mean_sq[kind])
                           / reference.trace[kind]}
        summary["arms"][name] = entry
    return summary


def learner_check(policy: FrozenPolicy, pool, pool_result, seed: int) -> float:
    """Relative gap between the learner's gradient of one pool draw and Σ c_j v_j of the same draw."""
    rng = np.random.default_rng(seed)
    picked = np.concatenate([rng.choice(m, size=8, replace=True) for m in pool.members])
    rollout = subset(pool_result.rollout, picked)
    worst = 0.0
    rewards, groups = pool.rewards[picked], pool.groups[picked]
    kinds = (("grpo_token_mean", "raft_token_mean") if policy.loss == "token_mean"
             else ("grpo_prompt_mean", "raft_accepted_mean"))
    for kind, probe in zip(kinds, (policy.grpo, policy.raft)):
        learner_grad, _ = probe(rollout, rewards.tolist())
        # The learner's prompt mean divides by all B prompts, those with no accepted sample included (§GVM.2).
        c = estimator_coefficients(kind, rewards, pool.lengths[picked], groups, pool.num_prompts)
        rows = pool.stored[picked]
        combined = torch.zeros(pool.vectors.shape[0], dtype=torch.float64)
        combined.index_add_(0, torch.as_tensor(rows[rows >= 0]), torch.as_tensor(c[rows >= 0]))
        ours = (combined.float() @ pool.vectors).double()
        worst = max(worst, float((ours - learner_grad.double()).norm() / learner_grad.double().norm().clamp_min(1e-30)))
    return worst


def print_tables(name: str, real: dict | None, pool: dict) -> None:
    if real:
        print(f"\n[{name}] real draws: tr Cov of the learner's gradient (R draws each)")
        print(f"{'arm/alg':<18}{'tr Cov':>11}{'GVM/unif':>9}{'95% CI':>15}{'‖Eg‖²':>11}{'noise/signal':>13}{'shift':>7}{'A=0':>6}  n min/med/max")
        for key, row in real.items():
            interval = "" if key.startswith("uniform") else f"[{row['ratio_ci95'][0]:.2f}, {row['ratio_ci95'][1]:.2f}]"
            print(f"{key:<18}{row['trace_cov']:>11.4g}{row['ratio_vs_uniform']:>9.3f}  {interval:<13}"
                  f"{row['mean_sq_norm']:>11.3g}{row['relative_noise_ratio']:>13.3f}"
                  f"{row['mean_shift_vs_uniform']:>7.2f}{row['zero_advantage_fraction']:>6.2f}  "
                  + "/".join(f"{v:.1f}" for v in row["allocation_min_median_max"]))
    print(f"\n[{name}] pool engine: tr Cov ratio vs uniform (relative noise tr Cov/‖Eg‖² ratio in parentheses)")
    print(f"{'arm':<24}" + "".join(f"{kind:>22}" for kind in ESTIMATORS) + f"{'GVM.2 pred':>11}")
    for arm, entry in pool["arms"].items():
        cells = "".join(f"{entry[k]['ratio_vs_uniform']:>13.3f} ({entry[k]['relative_noise_ratio']:>5.2f})" for k in ESTIMATORS)
        print(f"{arm:<24}{cells}{entry.get('gvm2_predicted_ratio', float('nan')):>11.3f}")
    print(f"\n[{name}] pool engine: E‖g − E g_uniform‖² / tr Cov_uniform (variance + squared shift of the expectation)")
    for arm, entry in pool["arms"].items():
        print(f"{arm:<24}" + "".join(f"{entry[k]['mse_vs_uniform_mean_ratio']:>22.3f}" for k in ESTIMATORS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=32, help="real draws per arm (R)")
    parser.add_argument("--prompts", type=int, default=16, help="B")
    parser.add_argument("--samples", type=int, default=8, help="budget per prompt: N = samples × B")
    parser.add_argument("--pilot", type=int, default=8, help="pilot samples per prompt (§GVM.5: 8)")
    parser.add_argument("--warmup", type=int, default=2, help="draws that fill the moving averages before measuring")
    parser.add_argument("--pool", type=int, default=32, help="pool samples per prompt (M)")
    parser.add_argument("--pool-draws", type=int, default=2000)
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss", default="shipped", choices=LOSSES,
                        help="the learner's loss in the real draws: shipped = configs/gvm_*.yaml's (prompt mean; RAFT++ "
                             "over accepted samples), token_mean = the quickstart's")
    parser.add_argument("--snapshots", nargs="+", default=["builtin", "trained"], choices=["builtin", "trained"])
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0],
                        help="one trained snapshot per seed (several: is a ratio a property of GVM or of one snapshot?)")
    parser.add_argument("--save", help="also write this run's per-snapshot results to this JSON file")
    parser.add_argument("--merge", nargs="+", help="no measuring: print the tables and JSON of saved runs together")
    args = parser.parse_args()
    if args.merge:
        saved = [json.loads(Path(path).read_text()) for path in args.merge]
        results = {name: entry for run in saved for name, entry in run["results"].items()}
        for name, entry in results.items():
            print_tables(name, entry["real"], entry["pool"])
        print(json.dumps(final_output(results, saved[0]["settings"], sum(run["wall_s"] for run in saved))))
        return
    print(f"machine: {machine()}", flush=True)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    paths = {}
    for name in args.snapshots:
        if name == "builtin":
            paths[name] = "builtin"
            continue
        for train_seed in args.train_seeds:   # seed 0 keeps the name earlier results use
            paths[name if train_seed == 0 else f"{name}_seed{train_seed}"] = str(trained_snapshot(args.train_steps, train_seed))
    settings = load_config(REPO / "configs" / "gvm_grpo.yaml").statistics
    raft_settings = load_config(REPO / "configs" / "gvm_raft.yaml").statistics
    print(f"GVM settings (gvm_grpo.yaml): alpha {settings.alpha}, beta {settings.beta}, n_min {settings.n_min}, "
          f"n_max {settings.n_max}, n_pilot (online, unseen) {settings.n_pilot}, ema {settings.ema_weight}; "
          f"pilot {args.pilot}/prompt; B {args.prompts}, N {args.prompts * args.samples}, R {args.draws}", flush=True)
    results = {}
    for index, (name, path) in enumerate(paths.items()):
        print(f"\nsnapshot {name} ({path})", flush=True)
        policy = FrozenPolicy(path, args.prompts, args.loss)
        seed = args.seed * 1_000_003 + 100_000 * index
        real = summarise_real(real_draws(policy, settings, args, seed), args.draws) if args.draws >= 2 else None
        pool, pool_result = build_pool(policy, args.pool, seed + 99_991)
        check = learner_check(policy, pool, pool_result, seed + 3)
        pool_summary = pool_arms(pool, settings, raft_settings, args, seed + 17)
        pool_summary["learner_vs_coefficient_gap"] = check
        pool_summary["pool_accuracy"] = float((pool.rewards == 1).mean())
        if real:
            for alg, kind in (("grpo", "grpo_token_mean"), ("raft", "raft_token_mean")):
                pool_summary[f"pool_over_real_uniform_trace_{alg}"] = (pool_summary["arms"]["uniform"][kind]["trace_cov"]
                                                                       / real[f"uniform/{alg}"]["trace_cov"])
        results[name] = {"real": real, "pool": pool_summary}
        print_tables(name, real, pool_summary)
        print(f"  learner vs Σ c_j v_j gap {check:.2e}; pool accuracy {pool_summary['pool_accuracy']:.3f}; "
              f"oracle p {pool_summary['oracle']['p']}", flush=True)
        del policy, pool
    run_settings = {"machine": machine(), "draws": args.draws, "prompts": args.prompts, "budget": args.prompts * args.samples,
                    "pilot": args.pilot, "pool_per_prompt": args.pool, "pool_draws": args.pool_draws,
                    "train_steps": args.train_steps, "train_seeds": args.train_seeds, "seed": args.seed, "loss": args.loss}
    wall = time.perf_counter() - started
    if args.save:
        Path(args.save).write_text(json.dumps({"settings": run_settings, "wall_s": wall, "results": results}))
    print(json.dumps(final_output(results, run_settings, wall)))


def final_output(results: dict, run_settings: dict, wall: float) -> dict:
    """The one JSON line: the issue's keys (pilot GVM / uniform, learner's loss, worst snapshot), then the rest."""
    output = {**run_settings, "wall_s": wall, "target": 0.7}

    def worst(prefix: str, arm: str, alg: str) -> None:
        by = {name: r["real"].get(f"{arm}/{alg}", {}).get("ratio_vs_uniform") if r["real"] else None
              for name, r in results.items()}
        values = [v for v in by.values() if v is not None]
        key = prefix + ARM_SUFFIX[arm]
        output[key] = max(values) if values else None
        output[key + "_by_snapshot"] = by

    for alg in ("grpo", "raft"):
        for arm in ARM_SUFFIX:
            worst(f"gvm_grad_variance_ratio_{alg}", arm, alg)
        output[f"zero_advantage_fraction_{alg}"] = {   # runs saved before the group arm lack it
            name: {arm: r["real"][f"{arm}/{alg}"]["zero_advantage_fraction"] for arm in REAL_ARMS
                   if f"{arm}/{alg}" in r["real"]}
            for name, r in results.items() if r["real"]}
    # The same RAFT++ draws with §GVM.2's estimator (accepted_normaliser 'expected'): uniform and GVM
    # divided by the same p̄, so they estimate the same gradient.
    for alg, (_, arm) in EXPECTED_ARMS.items():
        worst("gvm_grad_variance_ratio_raft_expected", arm, alg)
    output["diagnostic_arms"] = {name: {arm: {kind: round(entry[kind]["ratio_vs_uniform"], 4) for kind in ESTIMATORS}
                                        for arm, entry in r["pool"]["arms"].items()} for name, r in results.items()}
    output["diagnostic_arms_mse_vs_uniform_mean"] = {
        name: {arm: {kind: round(entry[kind]["mse_vs_uniform_mean_ratio"], 4) for kind in ESTIMATORS}
               for arm, entry in r["pool"]["arms"].items()} for name, r in results.items()}
    output["gvm_pilot_mean_shift"] = {name: {alg: r["real"][f"gvm_pilot/{alg}"]["mean_shift_vs_uniform"] for alg in ("grpo", "raft")}
                                      for name, r in results.items() if r["real"]}
    output["snapshots"] = results
    return output


if __name__ == "__main__":
    main()
