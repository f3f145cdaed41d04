"""Per-prompt statistics as flat arrays indexed by prompt id (DESIGN.md, statistics role).

Arrays, not dicts, so a million prompts cost a few tens of bytes each and updates are vectorised.
Tracked per prompt (ALGORITHMS.md §GVM.6, the online variant):

- `acceptance_rate_ema`  p̃ ← (1 − λ) p̃ + λ p̂_batch, initialised by the first observation;
- `accepted_ema_count`, `sample_ema_count`  discounted counts a ← (1 − λ) a + accepted,
  m ← (1 − λ) m + samples, whose Laplace-smoothed ratio (a + 1)/(m + 2) is what the allocator
  sees when smoothing is on (our reading of "Laplace smoothing of the EMA-weighted counts");
- `grad_norm_ema`  G̃ over accepted samples (§GVM.1), same EMA rule, updated only from batches
  in which the prompt had an accepted sample with a finite gradient norm;
- visit and sample counts.
"""
from __future__ import annotations

import numpy as np

from rl_service.algorithms.gvm import gvm_allocation, laplace_smoothed_acceptance, uniform_allocation

_ARRAYS = {
    "acceptance_rate_ema": np.float32,
    "accepted_ema_count": np.float64,
    "sample_ema_count": np.float64,
    "grad_norm_ema": np.float32,
    "grad_norm_count": np.int64,     # batches that contributed to grad_norm_ema
    "visit_count": np.int64,         # batches in which the prompt was sampled
    "sample_count": np.int64,        # completions generated for the prompt
}


def _ema(previous: np.ndarray, observed: np.ndarray, first: np.ndarray, weight: float) -> np.ndarray:
    return np.where(first, observed, (1.0 - weight) * previous + weight * observed)


class PromptStatistics:
    def __init__(self, ema_weight: float = 0.5, capacity: int = 1024):
        if not 0.0 < ema_weight <= 1.0:
            raise ValueError("ema_weight must be in (0, 1]")
        self.ema_weight = ema_weight
        self.nonfinite_grad_norms = 0
        for name, dtype in _ARRAYS.items():
            setattr(self, name, np.zeros(capacity, dtype=dtype))

    def _grow_to(self, max_id: int) -> None:
        if max_id < len(self.visit_count):
            return
        capacity = max(max_id + 1, 2 * len(self.visit_count))
        for name in _ARRAYS:
            old = getattr(self, name)
            new = np.zeros(capacity, dtype=old.dtype)
            new[:len(old)] = old
            setattr(self, name, new)

    @staticmethod
    def _unique_ids(prompt_ids) -> np.ndarray:
        prompt_ids = np.asarray(prompt_ids, dtype=np.int64)
        if len(np.unique(prompt_ids)) != len(prompt_ids):
            raise ValueError("a batch must list each prompt id once")
        if len(prompt_ids) and prompt_ids.min() < 0:
            raise ValueError("prompt ids must be >= 0")
        return prompt_ids

    def update_acceptance(self, prompt_ids, accepted, samples) -> None:
        """Fold one batch in: `accepted[k]` of `samples[k]` completions of prompt `prompt_ids[k]` passed."""
        prompt_ids = self._unique_ids(prompt_ids)
        accepted = np.asarray(accepted, dtype=np.float64)
        samples = np.asarray(samples, dtype=np.int64)
        seen = samples > 0
        prompt_ids, accepted, samples = prompt_ids[seen], accepted[seen], samples[seen]
        if len(prompt_ids) == 0:
            return
        self._grow_to(int(prompt_ids.max()))
        first_visit = self.visit_count[prompt_ids] == 0
        previous = self.acceptance_rate_ema[prompt_ids].astype(np.float64)
        updated = _ema(previous, accepted / samples, first_visit, self.ema_weight)
        self.acceptance_rate_ema[prompt_ids] = updated.astype(np.float32)
        decay = 1.0 - self.ema_weight
        self.accepted_ema_count[prompt_ids] = decay * self.accepted_ema_count[prompt_ids] + accepted
        self.sample_ema_count[prompt_ids] = decay * self.sample_ema_count[prompt_ids] + samples
        self.visit_count[prompt_ids] += 1
        self.sample_count[prompt_ids] += samples

    def update_grad_norms(self, prompt_ids, grad_norms) -> int:
        """Fold in each prompt's mean gradient norm over its accepted samples (§GVM.1).

        NaN marks "no accepted sample" and is skipped silently; an infinite value is a numerical
        failure: dropped, counted in `nonfinite_grad_norms`, and returned, never averaged in.
        """
        prompt_ids = self._unique_ids(prompt_ids)
        grad_norms = np.asarray(grad_norms, dtype=np.float64)
        if grad_norms.shape != prompt_ids.shape:
            raise ValueError(f"{len(grad_norms)} gradient norms for {len(prompt_ids)} prompts")
        infinite = np.isinf(grad_norms) | (grad_norms < 0)
        dropped = int(infinite.sum())
        self.nonfinite_grad_norms += dropped
        usable = np.isfinite(grad_norms) & ~infinite
        prompt_ids, grad_norms = prompt_ids[usable], grad_norms[usable]
        if len(prompt_ids):
            self._grow_to(int(prompt_ids.max()))
            first = self.grad_norm_count[prompt_ids] == 0
            previous = self.grad_norm_ema[prompt_ids].astype(np.float64)
            self.grad_norm_ema[prompt_ids] = _ema(previous, grad_norms, first, self.ema_weight).astype(np.float32)
            self.grad_norm_count[prompt_ids] += 1
        return dropped

    def acceptance_rate_of(self, prompt_ids) -> np.ndarray:
        """p̃ of each prompt (0 for a prompt never seen), float64."""
        prompt_ids = np.asarray(prompt_ids, dtype=np.int64)
        self._grow_to(int(prompt_ids.max(initial=0)))
        return self.acceptance_rate_ema[prompt_ids].astype(np.float64)

    def acceptance_for_allocation(self, prompt_ids: np.ndarray, laplace: bool) -> np.ndarray:
        if laplace:
            return laplace_smoothed_acceptance(self.accepted_ema_count[prompt_ids], self.sample_ema_count[prompt_ids])
        return self.acceptance_rate_ema[prompt_ids].astype(np.float64)

    def gvm_allocate(self, prompt_ids, budget: int, *, alpha: float, beta: float, n_min: int, n_max: int | None,
                     n_pilot: int, laplace: bool) -> np.ndarray:
        """Online GVM allocation of `budget` samples over a batch (ALGORITHMS.md §GVM.3–4, §GVM.6).

        Prompts never seen get a pilot of `n_pilot`; the rest of the budget goes to the seen prompts
        by `gvm_allocation` on p̃ (optionally Laplace-smoothed) and G̃. A seen prompt with no
        accepted sample yet takes the batch median of G̃ over prompts that have one (§GVM.6); if
        none has, every G is 1 and the allocation follows acceptance alone.
        """
        prompt_ids = self._unique_ids(prompt_ids)
        if len(prompt_ids) == 0:
            raise ValueError("allocation needs at least one prompt")
        self._grow_to(int(prompt_ids.max()))
        counts = np.zeros(len(prompt_ids), dtype=np.int64)
        seen = self.visit_count[prompt_ids] > 0
        unseen = ~seen
        pilot_total = n_pilot * int(unseen.sum())
        if pilot_total > budget:
            # More new prompts than the budget can pilot: pilot as many as fit, in batch order.
            counts[unseen] = uniform_allocation(int(unseen.sum()), budget)
            return counts
        if not seen.any():
            return np.asarray(uniform_allocation(len(prompt_ids), budget), dtype=np.int64)
        counts[unseen] = n_pilot
        seen_ids = prompt_ids[seen]
        acceptance = self.acceptance_for_allocation(seen_ids, laplace)
        has_grad = self.grad_norm_count[seen_ids] > 0
        grad = self.grad_norm_ema[seen_ids].astype(np.float64)
        fill = float(np.median(grad[has_grad])) if has_grad.any() else 1.0
        grad = np.where(has_grad, grad, fill)
        remaining = budget - pilot_total
        low = min(n_min, remaining // len(seen_ids))
        counts[seen] = gvm_allocation(acceptance, grad, remaining, alpha=alpha, beta=beta, n_min=low,
                                      n_max=n_max if n_max is None or n_max * len(seen_ids) >= remaining else None)
        return counts

    def summary(self) -> dict[str, float]:
        visited = self.visit_count > 0
        rates = self.acceptance_rate_ema[visited]
        if rates.size == 0:
            return {"prompts_seen": 0.0}
        histogram, _ = np.histogram(rates, bins=5, range=(0.0, 1.0))
        summary = {
            "prompts_seen": float(visited.sum()),
            "acceptance_rate_ema_mean": float(rates.mean()),
            "never_accepted_fraction": float((rates == 0).mean()),
            "always_accepted_fraction": float((rates == 1).mean()),
            "nonfinite_grad_norms": float(self.nonfinite_grad_norms),
        }
        with_grad = self.grad_norm_count > 0
        if with_grad.any():
            summary["grad_norm_ema_mean"] = float(self.grad_norm_ema[with_grad].mean())
        summary.update({f"acceptance_rate_ema_hist_{k}": float(count) for k, count in enumerate(histogram)})
        return summary

    def state_dict(self) -> dict[str, np.ndarray]:
        used = int(np.flatnonzero(self.visit_count | self.grad_norm_count).max()) + 1 \
            if (self.visit_count.any() or self.grad_norm_count.any()) else 0
        state = {name: getattr(self, name)[:used].copy() for name in _ARRAYS}
        state["ema_weight"] = np.array([self.ema_weight], dtype=np.float64)
        state["nonfinite_grad_norms"] = np.array([self.nonfinite_grad_norms], dtype=np.int64)
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.ema_weight = float(state["ema_weight"][0])
        self.nonfinite_grad_norms = int(state.get("nonfinite_grad_norms", np.zeros(1))[0])
        used = len(state["visit_count"])
        self._grow_to(max(used - 1, 0))
        for name in _ARRAYS:
            getattr(self, name)[:] = 0
            if name in state:
                getattr(self, name)[:used] = state[name]
