"""How GVM allocation and the statistics arrays scale: 10k / 100k / 1M prompts.

    .venv/bin/python benchmarks/gvm_allocation_scale.py [--sizes 10000 100000 1000000] [--repeats 5]

For each size N the statistics hold N prompts that have all been seen (acceptance and gradient-norm
EMAs filled from one update each); we then time (a) one `update_acceptance` + `update_grad_norms` of a
1,024-prompt batch, (b) the online allocation of a 1,024-prompt batch drawn from the N (what the
statistics actor does every step), and (c) one `gvm_allocation` over all N prompts at once (the offline
pilot's joint allocation of a chunk that large). Memory is the bytes of the statistics arrays.
The baseline for the ratio is the same allocation done uniformly (`uniform_allocation`), so the
printed ratio is the price of GVM's weights, bounds and sum-preserving rounding.
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine as common_machine  # noqa: E402

from rl_service.algorithms.gvm import gvm_allocation, online_gvm_allocation, uniform_allocation  # noqa: E402
from rl_service.statistics.prompt_stats import PromptStatistics  # noqa: E402


def best_of(repeats: int, function) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        timings.append(time.perf_counter() - started)
    return min(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1024)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    machine = common_machine()
    print(f"machine: {machine}")
    print(f"{'prompts':>10}{'state MB':>10}{'update ms':>11}{'alloc 1024 ms':>15}{'uniform ms':>12}"
          f"{'alloc all ms':>14}")
    result: dict = {"machine": machine, "batch": args.batch}
    for size in args.sizes:
        stats = PromptStatistics(ema_weight=0.5, capacity=size)
        all_ids = np.arange(size)
        samples = np.full(size, 8)
        stats.update_acceptance(all_ids, rng.binomial(8, rng.uniform(0, 1, size)), samples)
        stats.update_grad_norms(all_ids, rng.exponential(1.0, size))
        state_mb = sum(array.nbytes for array in stats.state_dict().values()) / 2**20
        batch_ids = rng.choice(size, args.batch, replace=False)
        batch_budget = 8 * args.batch

        def update() -> None:
            stats.update_acceptance(batch_ids, rng.binomial(8, 0.5, args.batch), np.full(args.batch, 8))
            stats.update_grad_norms(batch_ids, rng.exponential(1.0, args.batch))

        update_s = best_of(args.repeats, update)
        allocate_s = best_of(args.repeats, lambda: online_gvm_allocation(
            **stats.allocation_inputs(batch_ids, laplace=True), budget=batch_budget, alpha=1e-3, beta=2.0, n_min=1,
            n_max=64, n_pilot=4))
        uniform_s = best_of(args.repeats, lambda: uniform_allocation(args.batch, batch_budget))
        acceptance = stats.acceptance_for_allocation(all_ids, laplace=True)
        grad = stats.get("grad_norm_ema", all_ids).astype(np.float64)
        joint_s = best_of(max(1, args.repeats // 2), lambda: gvm_allocation(acceptance, grad, 8 * size, n_min=1, n_max=64))
        print(f"{size:>10}{state_mb:>10.1f}{update_s * 1e3:>11.3f}{allocate_s * 1e3:>15.3f}{uniform_s * 1e3:>12.3f}"
              f"{joint_s * 1e3:>14.1f}")
        result[str(size)] = {"state_mb": state_mb, "update_ms": update_s * 1e3, "allocate_batch_ms": allocate_s * 1e3,
                             "uniform_batch_ms": uniform_s * 1e3, "allocate_all_ms": joint_s * 1e3,
                             "gvm_vs_uniform_time_ratio": allocate_s / uniform_s}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
