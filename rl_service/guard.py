"""The collapse guard: stop a run whose greedy eval accuracy has fallen well below its best.

RL on a small model can collapse within a minute at too high a learning rate (DESIGN.md, the
built-in model); the guard stops the run and keeps the checkpoints. A drop counts only when it is
larger than `max_drop` **and** than three binomial standard errors of the eval set, so a small eval
split (16 prompts: one prompt is 6 points) does not stop a healthy run on noise.
"""
from __future__ import annotations

import math


def eval_collapsed(accuracies: list[float], max_drop: float | None, eval_size: int) -> bool:
    if max_drop is None or len(accuracies) < 2 or eval_size < 1:
        return False
    best, last = max(accuracies), accuracies[-1]
    standard_error = math.sqrt(max(best * (1.0 - best), 1e-12) / eval_size)
    return best - last > max(max_drop, 3.0 * standard_error)
