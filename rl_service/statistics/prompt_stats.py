"""Per-prompt statistics as flat arrays indexed by prompt id (DESIGN.md, statistics role).

Arrays, not dicts, so millions of prompts cost a few bytes each and updates are vectorised.
Acceptance is tracked as an exponential moving average (ALGORITHMS.md §GVM.6):
`p̃ ← (1 − λ) p̃ + λ p̂_batch`, initialised by the first observation.
"""
from __future__ import annotations

import numpy as np


def uniform_allocation(num_prompts: int, budget: int) -> list[int]:
    """Spread `budget` samples over prompts as evenly as integers allow (earlier prompts take the remainder)."""
    if num_prompts < 1:
        raise ValueError("num_prompts must be >= 1")
    if budget < 0:
        raise ValueError("budget must be >= 0")
    base, remainder = divmod(budget, num_prompts)
    return [base + (1 if index < remainder else 0) for index in range(num_prompts)]


class PromptStatistics:
    def __init__(self, ema_weight: float = 0.5, capacity: int = 1024):
        if not 0.0 < ema_weight <= 1.0:
            raise ValueError("ema_weight must be in (0, 1]")
        self.ema_weight = ema_weight
        self.acceptance_rate_ema = np.zeros(capacity, dtype=np.float32)
        self.visit_count = np.zeros(capacity, dtype=np.int64)      # batches in which the prompt was sampled
        self.sample_count = np.zeros(capacity, dtype=np.int64)     # completions generated for the prompt

    def _grow_to(self, max_id: int) -> None:
        if max_id < len(self.visit_count):
            return
        capacity = max(max_id + 1, 2 * len(self.visit_count))
        for name in ("acceptance_rate_ema", "visit_count", "sample_count"):
            old = getattr(self, name)
            new = np.zeros(capacity, dtype=old.dtype)
            new[:len(old)] = old
            setattr(self, name, new)

    def update_acceptance(self, prompt_ids: np.ndarray, accepted: np.ndarray, samples: np.ndarray) -> None:
        """Fold one batch in: `accepted[k]` of `samples[k]` completions of prompt `prompt_ids[k]` passed."""
        prompt_ids = np.asarray(prompt_ids, dtype=np.int64)
        accepted = np.asarray(accepted, dtype=np.float64)
        samples = np.asarray(samples, dtype=np.int64)
        if len(np.unique(prompt_ids)) != len(prompt_ids):
            raise ValueError("a batch must list each prompt id once")
        seen = samples > 0
        prompt_ids, accepted, samples = prompt_ids[seen], accepted[seen], samples[seen]
        if len(prompt_ids) == 0:
            return
        self._grow_to(int(prompt_ids.max()))
        batch_rate = accepted / samples
        first_visit = self.visit_count[prompt_ids] == 0
        previous = self.acceptance_rate_ema[prompt_ids].astype(np.float64)
        updated = np.where(first_visit, batch_rate, (1.0 - self.ema_weight) * previous + self.ema_weight * batch_rate)
        self.acceptance_rate_ema[prompt_ids] = updated.astype(np.float32)
        self.visit_count[prompt_ids] += 1
        self.sample_count[prompt_ids] += samples

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
        }
        summary.update({f"acceptance_rate_ema_hist_{k}": float(count) for k, count in enumerate(histogram)})
        return summary

    def state_dict(self) -> dict[str, np.ndarray]:
        used = int(np.flatnonzero(self.visit_count).max()) + 1 if self.visit_count.any() else 0
        return {
            "acceptance_rate_ema": self.acceptance_rate_ema[:used].copy(),
            "visit_count": self.visit_count[:used].copy(),
            "sample_count": self.sample_count[:used].copy(),
            "ema_weight": np.array([self.ema_weight], dtype=np.float64),
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.ema_weight = float(state["ema_weight"][0])
        used = len(state["visit_count"])
        self._grow_to(max(used - 1, 0))
        for name in ("acceptance_rate_ema", "visit_count", "sample_count"):
            getattr(self, name)[:] = 0
            getattr(self, name)[:used] = state[name]
