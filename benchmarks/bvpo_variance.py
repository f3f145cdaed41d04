"""Bias², variance and MSE of the BVPO gradient estimators on an enumerable toy (ALGORITHMS.md
"Miniature experiments", §BVPO.1–6).

    .venv/bin/python benchmarks/bvpo_variance.py [--seed 0] [--resamples 20000] [--trace-sampling posterior]

Toy policy for one prompt: a trace r = (r1, r2) of 2 tokens from a 4-symbol alphabet (16 traces),
then an answer y among 3. Parameters (one flat vector θ, 71 numbers): trace logits π(r1), π(r2|r1)
(tables), token embeddings e1[r1], e2[r2] and an answer head, π(y|r) = softmax(W tanh(e1[r1] + e2[r2])
+ c). The empty trace ∅ is a designated extra trace with its own embedding, π(y|∅) = softmax(W tanh(e∅)
+ c): like a reasoning model's empty think block, the reasoning-on policy never emits it, so it is
NOT a typical trace and the empty-trace estimator is genuinely biased (it also gives no gradient to
the trace logits or e1, e2). log π(∅|x) cancels between chosen and rejected, so L_e uses log π(y|∅).

Exact quantities (everything enumerates): the marginal π(y) = Σ_r π(r) π(y|r) and the TRUE gradient
g of the DPO loss of the marginal for a fixed pair (y_w = 0, y_l = 1), reference θ_ref (random), policy
θ = θ_ref + drift·N(0, I) (a policy some way into training). Estimators:
  g_t: DPO on the joint log π(r, y) with one trace for the chosen and one for the rejected answer. By
       default (``posterior``) r ~ π(r | x, y): the trace that accompanies answer y in reasoning-on
       generations; ``prior`` samples r ~ π(r | x) regardless of y (biased, for comparison).
  g_e: DPO on log π(∅, y): deterministic, zero variance.
  g_c: the bvpo_loss gradient α g_t + (1 − α) g_e, for α ∈ {0.25, 0.5, 0.75, α*, α̂}.
α* = optimal_alpha_from_moments on the enumerated moments (all 256 trace pairs); α̂ = OnlineAlphaEstimator
fed K = 4 trace resamples per update (full θ as the "cheap subset": the toy is small). Variance
(tr Cov), bias² (‖E g − g‖²) and MSE are measured over N resamples (same resamples for every
estimator) and also given exactly ("exact" columns). Nothing is tuned: seed 0, the stated sizes.
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine  # noqa: E402

from rl_service.algorithms.preference import (  # noqa: E402
    OnlineAlphaEstimator,
    PreferenceLogps,
    bvpo_loss,
    dpo_loss,
    optimal_alpha,
    optimal_alpha_from_moments,
)

F64 = torch.float64
ALPHABET, ANSWERS, HIDDEN = 4, 3, 4
SHAPES = {"first_logits": (ALPHABET,), "second_logits": (ALPHABET, ALPHABET), "embed_first": (ALPHABET, HIDDEN),
          "embed_second": (ALPHABET, HIDDEN), "embed_empty": (HIDDEN,), "answer_weight": (ANSWERS, HIDDEN),
          "answer_bias": (ANSWERS,)}
NUM_PARAMS = sum(torch.Size(s).numel() for s in SHAPES.values())
TRACES = torch.cartesian_prod(torch.arange(ALPHABET), torch.arange(ALPHABET))  # [16, 2]
CHOSEN, REJECTED = 0, 1



def unpack(theta: torch.Tensor) -> dict[str, torch.Tensor]:
    sizes = [torch.Size(s).numel() for s in SHAPES.values()]
    return {name: chunk.view(shape) for (name, shape), chunk in zip(SHAPES.items(), theta.split(sizes))}


def trace_logps(theta: torch.Tensor) -> torch.Tensor:
    """[16] log π(r) of every trace."""
    p = unpack(theta)
    first = torch.log_softmax(p["first_logits"], -1)[TRACES[:, 0]]
    second = torch.log_softmax(p["second_logits"], -1)[TRACES[:, 0], TRACES[:, 1]]
    return first + second


def answer_logps_given_traces(theta: torch.Tensor) -> torch.Tensor:
    """[16, Y] log π(y | r) of every trace."""
    p = unpack(theta)
    hidden = torch.tanh(p["embed_first"][TRACES[:, 0]] + p["embed_second"][TRACES[:, 1]])
    return torch.log_softmax(hidden @ p["answer_weight"].T + p["answer_bias"], -1)


def answer_logps_given_empty(theta: torch.Tensor) -> torch.Tensor:
    """[Y] log π(y | ∅)."""
    p = unpack(theta)
    return torch.log_softmax(p["answer_weight"] @ torch.tanh(p["embed_empty"]) + p["answer_bias"], -1)


def joint_logps(theta: torch.Tensor) -> torch.Tensor:
    """[16, Y] log π(r, y)."""
    return trace_logps(theta)[:, None] + answer_logps_given_traces(theta)


def dpo_of(mode: PreferenceLogps, beta: float) -> torch.Tensor:
    return dpo_loss(mode.policy_chosen_logps, mode.policy_rejected_logps, mode.ref_chosen_logps,
                    mode.ref_rejected_logps, beta)[0]


def gradient(loss_of_theta, theta: torch.Tensor) -> torch.Tensor:
    leaf = theta.detach().clone().requires_grad_(True)
    return torch.autograd.grad(loss_of_theta(leaf), leaf)[0]


def build_toy(seed: int, drift: float, beta: float, trace_sampling: str):
    """Returns the true gradient, the per-pair trace gradient table [256, P] with its pair
    probabilities, g_e, and a function α ↦ bvpo_loss gradient table [256, P]."""
    gen = torch.Generator().manual_seed(seed)
    theta_ref = torch.randn(NUM_PARAMS, generator=gen, dtype=F64)
    theta = theta_ref + drift * torch.randn(NUM_PARAMS, generator=gen, dtype=F64)
    ref_joint = joint_logps(theta_ref)
    ref_empty = answer_logps_given_empty(theta_ref)
    ref_marginal = torch.logsumexp(ref_joint, 0)

    def marginal_loss(t):
        marginal = torch.logsumexp(joint_logps(t), 0)  # log π(y) = log Σ_r π(r, y)
        return dpo_loss(marginal[CHOSEN:CHOSEN + 1], marginal[REJECTED:REJECTED + 1],
                        ref_marginal[CHOSEN:CHOSEN + 1], ref_marginal[REJECTED:REJECTED + 1], beta)[0]

    def mode_logps(t, r_w, r_l):
        joint, empty = joint_logps(t), answer_logps_given_empty(t)
        trace = PreferenceLogps(joint[r_w, CHOSEN:CHOSEN + 1], joint[r_l, REJECTED:REJECTED + 1],
                                ref_joint[r_w, CHOSEN:CHOSEN + 1], ref_joint[r_l, REJECTED:REJECTED + 1])
        empty = PreferenceLogps(empty[CHOSEN:CHOSEN + 1], empty[REJECTED:REJECTED + 1],
                                ref_empty[CHOSEN:CHOSEN + 1], ref_empty[REJECTED:REJECTED + 1])
        return trace, empty

    pairs = torch.cartesian_prod(torch.arange(len(TRACES)), torch.arange(len(TRACES)))  # [256, 2] (r_w, r_l)
    with torch.no_grad():
        joint = joint_logps(theta)
        if trace_sampling == "posterior":  # π(r | x, y) ∝ π(r, y)
            trace_w, trace_l = torch.softmax(joint[:, CHOSEN], 0), torch.softmax(joint[:, REJECTED], 0)
        else:  # π(r | x)
            trace_w = trace_l = trace_logps(theta).exp()
    pair_probs = trace_w[pairs[:, 0]] * trace_l[pairs[:, 1]]

    def bvpo_table(alpha: float) -> torch.Tensor:
        return torch.stack([gradient(lambda t: bvpo_loss(*mode_logps(t, int(w), int(l)), alpha, beta)[0], theta)
                            for w, l in pairs])

    g_true = gradient(marginal_loss, theta)
    trace_table = torch.stack([gradient(lambda t: dpo_of(mode_logps(t, int(w), int(l))[0], beta), theta)
                               for w, l in pairs])
    g_empty = gradient(lambda t: dpo_of(mode_logps(t, 0, 0)[1], beta), theta)
    return g_true, trace_table, pair_probs, g_empty, bvpo_table


def exact_stats(table: torch.Tensor, probs: torch.Tensor, g_true: torch.Tensor) -> dict[str, float]:
    mean = probs @ table
    variance = float(probs @ ((table - mean) ** 2).sum(1))
    bias_sq = float(((mean - g_true) ** 2).sum())
    return {"variance": variance, "bias_sq": bias_sq, "mse": variance + bias_sq}


def resampled_stats(samples: torch.Tensor, g_true: torch.Tensor) -> dict[str, float]:
    return {"variance": float(samples.var(0, unbiased=True).sum()),
            "bias_sq": float(((samples.mean(0) - g_true) ** 2).sum()),
            "mse": float(((samples - g_true) ** 2).sum(1).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resamples", type=int, default=20000)
    parser.add_argument("--drift", type=float, default=0.5, help="std of θ − θ_ref")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--trace-sampling", choices=("posterior", "prior"), default="posterior")
    parser.add_argument("--online-updates", type=int, default=300)
    parser.add_argument("--online-resamples", type=int, default=4, help="K trace resamples per α̂ update")
    parser.add_argument("--ema-decay", type=float, default=0.98)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()

    toy = build_toy(args.seed, args.drift, args.beta, args.trace_sampling)
    g_true, trace_table, pair_probs, g_empty, bvpo_table = toy
    single_point = torch.ones(1, dtype=F64)
    trace_exact = exact_stats(trace_table, pair_probs, g_true)
    empty_exact = exact_stats(g_empty[None], single_point, g_true)
    b_t, b_e = pair_probs @ trace_table - g_true, g_empty - g_true
    alpha_star = optimal_alpha_from_moments(trace_exact["variance"], 0.0, 0.0, b_t, b_e)

    gen = torch.Generator().manual_seed(args.seed + 1)
    resample_index = torch.multinomial(pair_probs, args.resamples, replacement=True, generator=gen)
    trace_samples = trace_table[resample_index]
    alpha_star_resampled = optimal_alpha(trace_samples, g_empty, g_true)

    estimator = OnlineAlphaEstimator(ema_decay=args.ema_decay)
    history = []
    for _ in range(args.online_updates):
        index = torch.multinomial(pair_probs, args.online_resamples, replacement=True, generator=gen)
        history.append(estimator.update(trace_table[index], g_empty))
    alpha_hat = estimator.alpha
    gap_sq = float(((b_e - b_t) ** 2).sum())
    alpha_hat_target = gap_sq / (trace_exact["variance"] + gap_sq)  # what §BVPO.6 estimates (b_t ≈ 0 assumed)

    rows = [("trace only (g_t)", 1.0, trace_samples, trace_table),
            ("empty only (g_e)", 0.0, g_empty.expand_as(trace_samples), None)]
    for name, alpha in [("BVPO α=0.25", 0.25), ("BVPO α=0.5", 0.5), ("BVPO α=0.75", 0.75),
                        ("BVPO α* (exact)", alpha_star), ("BVPO α̂ (online)", alpha_hat)]:
        table = bvpo_table(alpha)
        rows.append((name, alpha, table[resample_index], table))
    results = {}
    for name, alpha, samples, table in rows:
        exact = empty_exact if table is None else exact_stats(table, pair_probs, g_true)
        results[name] = (alpha, resampled_stats(samples, g_true), exact)

    print(f"machine: {machine()}; torch {torch.__version__}, 1 thread")
    print(f"toy: {len(TRACES)} traces x {ANSWERS} answers, {NUM_PARAMS} params, seed {args.seed}, drift {args.drift}, "
          f"beta {args.beta}, trace sampling {args.trace_sampling}, {args.resamples} resamples")
    print(f"‖g_true‖² = {float(g_true @ g_true):.4e}   tr Σ_t = {trace_exact['variance']:.4e}   "
          f"‖b_t‖² = {float(b_t @ b_t):.4e}   ‖b_e‖² = {float(b_e @ b_e):.4e}")
    print(f"α* exact = {alpha_star:.4f}   α* from resamples = {alpha_star_resampled:.4f}   α̂ = {alpha_hat:.4f} "
          f"(last 100 updates: {min(history[-100:]):.4f}..{max(history[-100:]):.4f}; its target "
          f"‖b_e−b_t‖²/(tr Σ_t+‖b_e−b_t‖²) = {alpha_hat_target:.4f})")
    header = (f"{'estimator':<20}{'alpha':>7}{'variance':>12}{'bias²':>12}{'MSE':>12}"
              f"{'var exact':>12}{'bias² exact':>13}{'MSE exact':>12}")
    print(header)
    print("-" * len(header))
    for name, (alpha, sampled, exact) in results.items():
        print(f"{name:<20}{alpha:>7.3f}{sampled['variance']:>12.4e}{sampled['bias_sq']:>12.4e}{sampled['mse']:>12.4e}"
              f"{exact['variance']:>12.4e}{exact['bias_sq']:>13.4e}{exact['mse']:>12.4e}")

    trace_s, empty_s = results["trace only (g_t)"][1], results["empty only (g_e)"][1]
    hat_s, star_s = results["BVPO α̂ (online)"][1], results["BVPO α* (exact)"][1]
    trace_x, empty_x = results["trace only (g_t)"][2], results["empty only (g_e)"][2]
    hat_x = results["BVPO α̂ (online)"][2]
    summary = {
        "variance_ratio_at_0_5": results["BVPO α=0.5"][1]["variance"] / trace_s["variance"],
        "mse_ratio_alpha_hat": hat_s["mse"] / min(trace_s["mse"], empty_s["mse"]),
        "mse_ratio_alpha_star": star_s["mse"] / min(trace_s["mse"], empty_s["mse"]),
        "mse_ratio_alpha_hat_exact": hat_x["mse"] / min(trace_x["mse"], empty_x["mse"]),
        "alpha_hat": alpha_hat, "alpha_star": alpha_star, "alpha_star_resampled": alpha_star_resampled,
        "alpha_hat_target": alpha_hat_target,
        "mse_trace": trace_s["mse"], "mse_empty": empty_s["mse"], "mse_alpha_0_5": results["BVPO α=0.5"][1]["mse"],
        "mse_alpha_star": star_s["mse"], "mse_alpha_hat": hat_s["mse"],
        "variance_trace": trace_s["variance"], "bias_sq_trace": trace_s["bias_sq"], "bias_sq_empty": empty_s["bias_sq"],
        "g_true_norm_sq": float(g_true @ g_true), "trace_sampling": args.trace_sampling, "seed": args.seed,
        "resamples": args.resamples, "machine": machine(), "seconds": round(time.perf_counter() - start, 2),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
