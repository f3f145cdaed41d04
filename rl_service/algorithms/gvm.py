"""Gradient-variance-minimising sample allocation, ALGORITHMS.md §GVM (pure numpy, no Ray, no torch).

Pipeline: per-prompt acceptance rate ``p_i`` and gradient norm ``G_i`` (§GVM.1, see
:mod:`rl_service.algorithms.grad_norms`) → weights ``w_i`` (:func:`gvm_weights`, §GVM.3) → real targets
``n_i*`` → integer counts with ``Σ n_i = N`` exactly (:func:`round_preserving_sum`, §GVM.4), all in
:func:`gvm_allocation`, which also applies the **(ours)** bounds ``n_min ≤ n_i ≤ n_max``.
:func:`online_gvm_allocation` is the §GVM.6 online policy around it (pilot for unseen prompts, a G
for prompts with no accepted sample yet, bounds, fallback): the statistics role only stores the
moving averages and calls it.
"""

from __future__ import annotations

import numbers

import numpy as np


__all__ = [
    "allocation_spread_metrics",
    "gvm_allocation",
    "gvm_weights",
    "laplace_smoothed_acceptance",
    "online_gvm_allocation",
    "round_preserving_sum",
    "uniform_allocation",
]


def _finite_vector(name: str, values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"{name}[{bad[0]}] is not finite ({array[bad[0]]})")
    return array


# Above 2**53 float64 cannot hold every integer: targets n* lose whole samples and Σ n_i = N (§GVM.4)
# could not be promised, so budgets past it are refused by name.
_MAX_EXACT_TOTAL = 2**53


def _count(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def uniform_allocation(num_prompts: int, budget: int) -> list[int]:
    """Spread `budget` samples over prompts as evenly as integers allow (earlier prompts take the remainder)."""
    if num_prompts < 1:
        raise ValueError("num_prompts must be >= 1")
    if budget < 0:
        raise ValueError("budget must be >= 0")
    base, remainder = divmod(budget, num_prompts)
    return [base + (1 if index < remainder else 0) for index in range(num_prompts)]


def gvm_weights(acceptance_rate, grad_norm, alpha: float = 1e-3, beta: float = 2.0) -> np.ndarray:
    """Allocation weights ``w_i = G_i / √(p_i + α / p_i^(β−1))``, ALGORITHMS.md §GVM.3, in float64.

    Prompts with ``p_i = 0`` or ``G_i = 0`` get weight 0 (§GVM.4, the paper's code). The ``α`` term
    keeps near-impossible prompts from eating the budget (α = 0 gives the unregularised ``G_i / √p_i``
    of §GVM.2). Raises ``ValueError`` for a non-finite input (naming its index), ``p_i`` outside
    [0, 1], ``G_i < 0``, ``α < 0`` or ``β < 1``.
    """
    p = _finite_vector("acceptance_rate", acceptance_rate)
    g = _finite_vector("grad_norm", grad_norm)
    if p.shape != g.shape:
        raise ValueError(f"acceptance_rate and grad_norm differ in shape: {p.shape} vs {g.shape}")
    for name, values, bad in (("acceptance_rate", p, (p < 0) | (p > 1)), ("grad_norm", g, g < 0)):
        if bad.any():
            index = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{name}[{index}] = {values[index]} is out of range")
    if not (np.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
    if not (np.isfinite(beta) and beta >= 1):
        raise ValueError(f"beta must be finite and >= 1, got {beta}")
    weights = np.zeros_like(p)
    live = (p > 0) & (g > 0)
    p_live = p[live]
    with np.errstate(divide="ignore", over="ignore"):
        # α / p^(β−1) may overflow to +inf for a tiny p: the weight then underflows to 0, as it should.
        regulariser = alpha / p_live ** (beta - 1) if alpha > 0 else np.zeros_like(p_live)
        weights[live] = g[live] / np.sqrt(p_live + regulariser)
    return weights


def round_preserving_sum(targets, total: int, *, lower: int = 0, upper: int | None = None) -> np.ndarray:
    """Integer counts near ``targets`` that sum to ``total`` exactly, ALGORITHMS.md §GVM.4 (GVM code rule).

    Round each target to nearest, ties to even (``np.rint``); then, while the sum is short (long), add
    (remove) one sample at the entry with the largest (smallest) residual ``n* − round(n*)``, ties to
    the lower index first **(ours)**. Not floor-plus-largest-remainder: for ``n* = [0.5, 1.5]``,
    ``total = 2`` the rint step already gives ``[0, 2]`` (largest remainder would give ``[1, 1]``).

    Because the targets sum to ``total``, every residual lies in [−0.5, 0.5] and the sum is off by at
    most B/2, the k corrections go to k distinct entries: the first k of a stable argsort, no loop.
    Each corrected entry has a residual of the right sign, so integer bounds that the targets respect
    (``lower ≤ n* ≤ upper``) are respected by the counts; entries at a bound are skipped anyway.

    Args:
        targets: [B] real targets ``n_i*``, finite, within [lower, upper], summing to ``total``
            (to 1e-9 relative; anything else is a caller bug and raises ``ValueError``).
        total: the exact integer sum wanted.
        lower, upper: integer bounds on each count (``upper=None``: none).

    Returns:
        [B] int64 counts.
    """
    n_star = _finite_vector("targets", targets)
    total = _count("total", total)
    if total > _MAX_EXACT_TOTAL:
        raise ValueError(f"total={total} exceeds 2**53, past which float64 targets are not exact integers")
    lower = _count("lower", lower)
    upper_bound = np.inf if upper is None else _count("upper", upper, lower)
    if n_star.size and (n_star.min() < lower or n_star.max() > upper_bound):
        raise ValueError(f"targets must lie in [{lower}, {upper_bound}], got [{n_star.min()}, {n_star.max()}]")
    if abs(n_star.sum() - total) > 1e-9 * max(1.0, float(total)):
        raise ValueError(f"targets sum to {n_star.sum()!r}, not to total={total}")
    counts = np.rint(n_star).astype(np.int64)
    residual = n_star - counts
    missing = total - int(counts.sum())
    if missing > 0:
        order = np.argsort(-residual, kind="stable")  # largest residual first, lower index on ties
        order = order[counts[order] < upper_bound]
        counts[order[:missing]] += 1
    elif missing < 0:
        order = np.argsort(residual, kind="stable")  # smallest residual first, lower index on ties
        order = order[counts[order] > lower]
        counts[order[:-missing]] -= 1
    if int(counts.sum()) != total:  # unreachable for valid targets; guards the reasoning above
        raise ValueError(f"cannot reach total={total} within bounds [{lower}, {upper_bound}]")
    return counts


def _clipped_targets(weights: np.ndarray, budget: int, lower: int, upper: float) -> np.ndarray:
    """Real ``n* = clip(λ w, lower, upper)`` with ``Σ n* = budget``, λ solved exactly (§GVM.4, ours).

    ``f(λ) = Σ clip(λ w_i, lower, upper)`` is continuous, non-decreasing and piecewise linear with
    breakpoints ``lower / w_i`` and ``upper / w_i``: evaluate f at every breakpoint, find the segment
    that contains ``budget``, and solve the linear piece there. Zero weights (and weights 1e-250 times
    below the largest, beyond float range for λ) sit at ``lower`` unless every other prompt is at
    ``upper``; they then share the rest evenly (the ``w → 0⁺`` limit; ours).
    """
    w_all = weights / weights.max()
    positive = w_all > 1e-250
    target = np.full(weights.shape, float(lower))
    w = w_all[positive]
    size = w.size
    remaining = budget - lower * (weights.size - size)  # what the positive-weight prompts must take
    if remaining >= size * upper:  # all positive-weight prompts saturate; zero weights take the rest
        target[positive] = upper
        zero = np.flatnonzero(~positive)
        if zero.size:
            target[zero] = lower + (budget - int(upper) * size - lower * zero.size) / zero.size
        return target
    order = np.argsort(-w, kind="stable")
    w_sorted = w[order]
    low_break = lower / w_sorted  # ascending: below it, clipped at lower
    high_break = upper / w_sorted  # ascending: above it, clipped at upper (inf if no upper bound)
    # Suffix sums, added from the smallest weight up: the middle sum below has no cancellation.
    suffix = np.concatenate([np.cumsum(w_sorted[::-1])[::-1], [0.0]])

    def fixed_part(at_upper, at_lower):
        return (upper * at_upper if np.isfinite(upper) else 0.0 * at_upper) + lower * at_lower

    candidates = np.unique(np.concatenate([low_break, high_break[np.isfinite(high_break)]]))
    at_upper = np.searchsorted(high_break, candidates, side="left")
    at_lower = size - np.searchsorted(low_break, candidates, side="right")
    f = fixed_part(at_upper, at_lower) + candidates * (suffix[at_upper] - suffix[size - at_lower])
    # max(…, 0): f at the first breakpoint may exceed ``remaining = lower·P`` by a rounding error.
    segment = max(int(np.searchsorted(f, remaining, side="right")) - 1, 0)
    stop = candidates[segment + 1] if segment + 1 < candidates.size else np.inf
    # Membership is constant inside (start, stop): the first ``at_upper`` sorted prompts sit at upper,
    # the last ``at_lower`` at lower, and the middle ones share the rest in proportion to w.
    at_upper = int(np.searchsorted(high_break, candidates[segment], side="right"))
    at_lower = size - int(np.searchsorted(low_break, stop, side="left"))
    middle = slice(at_upper, size - at_lower)
    sorted_targets = np.full(size, float(lower))
    sorted_targets[:at_upper] = upper
    if w_sorted[middle].size:  # empty: a flat piece at exactly ``remaining`` (rounding moved the segment)
        mass = remaining - fixed_part(at_upper, at_lower)
        sorted_targets[middle] = np.clip(mass * (w_sorted[middle] / w_sorted[middle].sum()), lower, upper)
    target[np.flatnonzero(positive)[order]] = sorted_targets
    return target


def gvm_allocation(acceptance_rate, grad_norm, budget: int, alpha: float = 1e-3, beta: float = 2.0,
                   n_min: int = 0, n_max: int | None = None) -> np.ndarray:
    """Per-prompt sample counts ``n_i`` with ``Σ n_i = budget``, ALGORITHMS.md §GVM.3–4.

    ``w = gvm_weights(p, G, α, β)``; ``n_i* = N w_i / Σ_k w_k``; integer counts by
    :func:`round_preserving_sum`. Bounds **(ours)**: if ``n*`` leaves ``[n_min, n_max]``, use
    ``n_i* = clip(λ w_i, n_min, n_max)`` with λ solved exactly so that ``Σ n_i* = N`` (zero-weight
    prompts stay at ``n_min`` unless all others sit at ``n_max``); with no bound binding the result
    is the unbounded code rule, bit for bit. Every weight 0: uniform allocation (ours, §GVM.4).

    Raises ``ValueError`` on bad inputs (see :func:`gvm_weights`), an empty batch, ``n_min > n_max``,
    a budget outside ``[n_min·B, n_max·B]`` or above 2**53 (float64 targets are then not exact).
    """
    weights = gvm_weights(acceptance_rate, grad_norm, alpha, beta)
    num_prompts = weights.size
    if num_prompts == 0:
        raise ValueError("gvm_allocation needs at least one prompt")
    budget = _count("budget", budget)
    if budget > _MAX_EXACT_TOTAL:
        raise ValueError(f"budget={budget} exceeds 2**53, past which float64 targets are not exact integers")
    n_min = _count("n_min", n_min)
    if n_max is not None:
        n_max = _count("n_max", n_max)
        if n_min > n_max:
            raise ValueError(f"n_min={n_min} exceeds n_max={n_max}")
    if budget < n_min * num_prompts:
        raise ValueError(f"budget={budget} < n_min·B = {n_min}·{num_prompts}: the lower bound cannot be met")
    if n_max is not None and budget > n_max * num_prompts:
        raise ValueError(f"budget={budget} > n_max·B = {n_max}·{num_prompts}: the budget cannot be spent")
    with np.errstate(over="ignore"):
        weight_sum = weights.sum()
        overflows = not np.isfinite(weight_sum * max(budget, 1))
    if overflows:
        # G near float64's top: w, Σw or N·w overflows. n* = N w / Σw does not change when every G is
        # scaled by one constant, so allocate from G / max G (then w ≤ 1/√p, far from overflow).
        grad_norm = np.asarray(grad_norm, dtype=np.float64)
        weights = gvm_weights(acceptance_rate, grad_norm / grad_norm.max(), alpha, beta)
        weight_sum = weights.sum()
    if weight_sum == 0:
        return np.asarray(uniform_allocation(num_prompts, budget), dtype=np.int64)
    upper = np.inf if n_max is None else n_max
    n_star = budget * weights / weight_sum  # §GVM.3, exactly the code's expression
    if n_star.min() < n_min or n_star.max() > upper:
        n_star = _clipped_targets(weights, budget, n_min, upper)
    return round_preserving_sum(n_star, budget, lower=n_min, upper=n_max)


def _statistics_arrays(seen, acceptance_rate, grad_norm, has_grad_norm):
    seen = np.asarray(seen, dtype=bool)
    p = _finite_vector("acceptance_rate", acceptance_rate)
    g = np.asarray(grad_norm, dtype=np.float64)
    has_g = np.asarray(has_grad_norm, dtype=bool)
    if not (seen.shape == p.shape == g.shape == has_g.shape) or seen.ndim != 1:
        raise ValueError(f"seen, acceptance_rate, grad_norm and has_grad_norm must be 1-D and of one shape: "
                         f"{seen.shape}, {p.shape}, {g.shape}, {has_g.shape}")
    return seen, p, g, has_g


def online_gvm_allocation(seen, acceptance_rate, grad_norm, has_grad_norm, budget: int, *, alpha: float = 1e-3,
                          beta: float = 2.0, n_min: int = 1, n_max: int | None = None, n_pilot: int = 4,
                          group: dict | None = None) -> np.ndarray:
    """The online GVM policy, ALGORITHMS.md §GVM.6 (ours): counts ``n_i`` with ``Σ n_i = budget``.

    Args (all [B], one entry per prompt of the batch):
        seen: whether the prompt has statistics (was sampled before).
        acceptance_rate: its p̃ (EMA, or the Laplace-smoothed counts when that option is on).
        grad_norm, has_grad_norm: its G̃ and whether it has one (an accepted sample with a finite norm).
        group: optional statistics of each prompt's group (prompts that are alike, e.g. one difficulty
            level), the same four keys; a prompt never seen whose group was seen takes its group's
            p̃ and G̃ instead of a pilot (ours: with a pool larger than steps × prompts a step, no
            prompt is seen twice and the per-prompt policy would be uniform allocation).

    Rules, in order:
    - a prompt never seen whose group was seen counts as seen, with its group's statistics;
    - a prompt never seen gets a pilot of ``n_pilot``; if the budget cannot pilot every new prompt,
      it pilots as many as fit, spread uniformly in batch order, and the seen prompts get nothing;
    - a batch with no seen prompt is spread uniformly;
    - a seen prompt with no G takes the median G of the seen prompts that have one (§GVM.6); if none
      has, every G is 1 and the allocation follows acceptance alone;
    - the rest of the budget goes to the seen prompts by :func:`gvm_allocation` (§GVM.3–4) with
      ``n_min`` (lowered to what the rest can give each) and ``n_max`` (dropped when it cannot hold
      the rest).
    """
    seen, p, g, has_g = _statistics_arrays(seen, acceptance_rate, grad_norm, has_grad_norm)
    if group is not None:
        group_seen, group_p, group_g, group_has_g = _statistics_arrays(**group)
        if group_seen.shape != seen.shape:
            raise ValueError(f"group statistics cover {group_seen.size} prompts, the batch has {seen.size}")
        borrow = ~seen & group_seen
        seen = seen | borrow
        p, g, has_g = (np.where(borrow, group_p, p), np.where(borrow, group_g, g),
                       np.where(borrow, group_has_g, has_g))
    if seen.size == 0:
        raise ValueError("allocation needs at least one prompt")
    # Checked here, not only in gvm_allocation, whose error indices count the seen prompts alone.
    for name, values, bad in (("acceptance_rate", p, seen & ((p < 0) | (p > 1))),
                              ("grad_norm", g, seen & has_g & ~(np.isfinite(g) & (g >= 0)))):
        if bad.any():
            index = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{name}[{index}] = {values[index]} is out of range")
    budget = _count("budget", budget)
    n_pilot = _count("n_pilot", n_pilot, 1)
    counts = np.zeros(seen.size, dtype=np.int64)
    unseen = ~seen
    pilot_total = n_pilot * int(unseen.sum())
    if pilot_total > budget:
        counts[unseen] = uniform_allocation(int(unseen.sum()), budget)
        return counts
    if not seen.any():
        return np.asarray(uniform_allocation(seen.size, budget), dtype=np.int64)
    counts[unseen] = n_pilot
    g_seen, has_g_seen = g[seen], has_g[seen]
    fill = float(np.median(g_seen[has_g_seen])) if has_g_seen.any() else 1.0
    g_seen = np.where(has_g_seen, g_seen, fill)
    remaining = budget - pilot_total
    prompts = int(seen.sum())
    low = min(_count("n_min", n_min), remaining // prompts)
    high = n_max if n_max is None or n_max * prompts >= remaining else None
    counts[seen] = gvm_allocation(p[seen], g_seen, remaining, alpha=alpha, beta=beta, n_min=low, n_max=high)
    return counts


def laplace_smoothed_acceptance(accepted_ema_count, sample_ema_count):
    """``(a + 1) / (m + 2)`` of EMA-weighted accepted / generated counts, ALGORITHMS.md §GVM.6 (option).

    Never 0 or 1, so one unlucky batch cannot give a prompt weight 0 for ever. Works element-wise on
    scalars or arrays (float64); raises ``ValueError`` for negative or non-finite counts or ``a > m``.
    """
    accepted = np.asarray(accepted_ema_count, dtype=np.float64)
    samples = np.asarray(sample_ema_count, dtype=np.float64)
    if not (np.isfinite(accepted).all() and np.isfinite(samples).all()):
        raise ValueError("accepted and sample counts must be finite")
    if (accepted < 0).any() or (accepted > samples * (1 + 1e-12) + 1e-12).any():
        raise ValueError("need 0 <= accepted_ema_count <= sample_ema_count")
    return (accepted + 1.0) / (samples + 2.0)


def allocation_spread_metrics(counts, acceptance_rate) -> dict[str, float]:
    """How unevenly an allocation spreads the budget (for logging, ALGORITHMS.md §GVM.3–4).

    Keys: ``allocation_samples_min`` / ``_median`` / ``_max`` (n_i), ``allocation_hardest_decile_share``
    (fraction of Σ n_i given to the ⌈B/10⌉ prompts of lowest acceptance rate, lower index first on
    ties; 0 when the budget is 0) and ``allocation_zero_fraction`` (fraction of prompts with n_i = 0).
    """
    n = _finite_vector("counts", counts)
    p = _finite_vector("acceptance_rate", acceptance_rate)
    if n.shape != p.shape or n.size == 0:
        raise ValueError(f"counts and acceptance_rate must be non-empty and equal in shape: {n.shape} vs {p.shape}")
    hardest = np.argsort(p, kind="stable")[: -(-n.size // 10)]
    total = n.sum()
    return {
        "allocation_samples_min": float(n.min()),
        "allocation_samples_median": float(np.median(n)),
        "allocation_samples_max": float(n.max()),
        "allocation_hardest_decile_share": float(n[hardest].sum() / total) if total > 0 else 0.0,
        "allocation_zero_fraction": float((n == 0).mean()),
    }
