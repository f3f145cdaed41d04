"""Per-prompt statistics as flat arrays, one dense slot per prompt seen (DESIGN.md, statistics role).

Arrays, not dicts, so a million prompts cost a few tens of bytes each and updates are vectorised.
Prompt ids are mapped to slots in the order they first appear (a sorted id index, looked up with
`searchsorted`), never used as array indices: an id of 2**40 − 1 costs one slot, not 4 TiB.
Tracked per prompt (ALGORITHMS.md §GVM.6, the online variant):

- `acceptance_rate_ema`  p̃ ← (1 − λ) p̃ + λ p̂_batch, initialised by the first observation;
- `accepted_ema_count`, `sample_ema_count`  discounted counts a ← (1 − λ) a + accepted,
  m ← (1 − λ) m + samples, whose Laplace-smoothed ratio (a + 1)/(m + 2) is what the allocator
  sees when smoothing is on (our reading of "Laplace smoothing of the EMA-weighted counts");
- `grad_norm_ema`  G̃ over accepted samples (§GVM.1), same EMA rule, updated only from batches
  in which the prompt had an accepted sample with a finite gradient norm;
- visit and sample counts.

"Accepted" is the one definition of `rl_service.algorithms.acceptance`; the caller counts it.
`GroupStatistics`, the same arrays keyed by group id, holds the moving averages of groups of alike
prompts (a difficulty level) for prompts never seen (`statistics.unseen_prompts: group`).
The allocation policy itself is `rl_service.algorithms.gvm.online_gvm_allocation`: this class only
stores and hands over the moving averages.
"""
from __future__ import annotations

import hashlib

import numpy as np

from rl_service.algorithms.gvm import laplace_smoothed_acceptance, uniform_allocation

__all__ = ["GroupStatistics", "PromptStatistics", "group_ids", "group_mean", "group_totals", "uniform_allocation"]

_ARRAYS = {
    "acceptance_rate_ema": np.float64,
    "accepted_ema_count": np.float64,
    "sample_ema_count": np.float64,
    "grad_norm_ema": np.float64,
    "grad_norm_count": np.int64,     # batches that contributed to grad_norm_ema
    "visit_count": np.int64,         # batches in which the prompt was sampled
    "sample_count": np.int64,        # completions generated for the prompt
}


def group_ids(names) -> np.ndarray:
    """A stable id in [0, 2**40) for each group name (the first 5 bytes of its SHA-256), −1 for None.

    A hash, not a table: the ids survive a restart with no mapping to checkpoint, and two of a few
    thousand names collide with probability ~1e-5."""
    return np.asarray([-1 if name is None else
                       int.from_bytes(hashlib.sha256(str(name).encode("utf-8")).digest()[:5], "big")
                       for name in names], dtype=np.int64)


def group_totals(ids: np.ndarray, *columns) -> tuple[np.ndarray, ...]:
    """The distinct group ids ≥ 0 of a batch and each column summed over the group's prompts."""
    ids = np.asarray(ids, dtype=np.int64)
    known = ids >= 0
    unique, inverse = np.unique(ids[known], return_inverse=True)
    return (unique, *(np.bincount(inverse, weights=np.asarray(column, dtype=np.float64)[known], minlength=unique.size)
                      for column in columns))


def group_mean(ids: np.ndarray, values) -> tuple[np.ndarray, np.ndarray]:
    """The distinct group ids ≥ 0 and the mean of each group's finite values (NaN for a group with none)."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    unique, sums, counts = group_totals(ids, np.where(finite, values, 0.0), finite)
    means = np.full(unique.size, np.nan)
    np.divide(sums, counts, out=means, where=counts > 0)
    return unique, means


def _ema(previous: np.ndarray, observed: np.ndarray, first: np.ndarray, weight: float) -> np.ndarray:
    return np.where(first, observed, (1.0 - weight) * previous + weight * observed)


class PromptStatistics:
    def __init__(self, ema_weight: float = 0.5, capacity: int = 1024):
        if not 0.0 < ema_weight <= 1.0:
            raise ValueError("ema_weight must be in (0, 1]")
        self.ema_weight = ema_weight
        self.nonfinite_grad_norms = 0
        self.size = 0                                        # slots in use
        self.slot_ids = np.zeros(capacity, dtype=np.int64)   # prompt id of each slot
        self._sorted_ids = np.zeros(0, dtype=np.int64)       # ids in use, ascending …
        self._sorted_slots = np.zeros(0, dtype=np.int64)     # … and their slots
        for name, dtype in _ARRAYS.items():
            setattr(self, name, np.zeros(capacity, dtype=dtype))

    # -- id → slot ---------------------------------------------------------------------------
    def _lookup(self, prompt_ids: np.ndarray) -> np.ndarray:
        """Slot of each id, −1 for an id never stored."""
        if self._sorted_ids.size == 0:
            return np.full(prompt_ids.shape, -1, dtype=np.int64)
        position = np.searchsorted(self._sorted_ids, prompt_ids)
        found = position < self._sorted_ids.size
        found[found] = self._sorted_ids[position[found]] == prompt_ids[found]
        return np.where(found, self._sorted_slots[np.minimum(position, self._sorted_ids.size - 1)], -1)

    def _slots(self, prompt_ids: np.ndarray) -> np.ndarray:
        """Slot of each id, giving new ids fresh slots (in batch order)."""
        slots = self._lookup(prompt_ids)
        new = slots < 0
        if new.any():
            new_ids = prompt_ids[new]
            fresh = np.arange(self.size, self.size + new_ids.size, dtype=np.int64)
            self._reserve(self.size + new_ids.size)
            self.slot_ids[fresh] = new_ids
            self.size += new_ids.size
            slots[new] = fresh
            ids = np.concatenate([self._sorted_ids, new_ids])
            order = np.argsort(ids, kind="stable")
            self._sorted_ids, self._sorted_slots = ids[order], np.concatenate([self._sorted_slots, fresh])[order]
        return slots

    def _reserve(self, size: int) -> None:
        if size <= len(self.visit_count):
            return
        capacity = max(size, 2 * len(self.visit_count))
        for name in (*_ARRAYS, "slot_ids"):
            old = getattr(self, name)
            new = np.zeros(capacity, dtype=old.dtype)
            new[:len(old)] = old
            setattr(self, name, new)

    def get(self, name: str, prompt_ids) -> np.ndarray:
        """The values of array `name` for `prompt_ids` (0 for an id never seen)."""
        prompt_ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        slots = self._lookup(prompt_ids)
        values = np.zeros(prompt_ids.size, dtype=_ARRAYS[name])
        values[slots >= 0] = getattr(self, name)[slots[slots >= 0]]
        return values

    @staticmethod
    def _unique_ids(prompt_ids) -> np.ndarray:
        prompt_ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        if len(np.unique(prompt_ids)) != len(prompt_ids):
            raise ValueError("a batch must list each prompt id once")
        if len(prompt_ids) and prompt_ids.min() < 0:
            raise ValueError("prompt ids must be >= 0")
        return prompt_ids

    # -- updates -------------------------------------------------------------------------------
    def update_acceptance(self, prompt_ids, accepted, samples) -> None:
        """Fold one batch in: `accepted[k]` of `samples[k]` completions of prompt `prompt_ids[k]` passed."""
        prompt_ids = self._unique_ids(prompt_ids)
        accepted = np.asarray(accepted, dtype=np.float64)
        samples = np.asarray(samples, dtype=np.int64)
        if ((accepted < 0) | (accepted > samples) | ~np.isfinite(accepted)).any():
            bad = int(np.flatnonzero((accepted < 0) | (accepted > samples) | ~np.isfinite(accepted))[0])
            raise ValueError(f"accepted[{bad}] = {accepted[bad]} is not a count within [0, samples={samples[bad]}]")
        seen = samples > 0
        prompt_ids, accepted, samples = prompt_ids[seen], accepted[seen], samples[seen]
        if len(prompt_ids) == 0:
            return
        slots = self._slots(prompt_ids)
        first_visit = self.visit_count[slots] == 0
        self.acceptance_rate_ema[slots] = _ema(self.acceptance_rate_ema[slots], accepted / samples, first_visit,
                                               self.ema_weight)
        decay = 1.0 - self.ema_weight
        self.accepted_ema_count[slots] = decay * self.accepted_ema_count[slots] + accepted
        self.sample_ema_count[slots] = decay * self.sample_ema_count[slots] + samples
        self.visit_count[slots] += 1
        self.sample_count[slots] += samples

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
            slots = self._slots(prompt_ids)
            first = self.grad_norm_count[slots] == 0
            self.grad_norm_ema[slots] = _ema(self.grad_norm_ema[slots], grad_norms, first, self.ema_weight)
            self.grad_norm_count[slots] += 1
        return dropped

    # -- what the allocator reads ----------------------------------------------------------------
    def acceptance_rate_of(self, prompt_ids) -> np.ndarray:
        """p̃ of each prompt (0 for a prompt never seen), float64."""
        return self.get("acceptance_rate_ema", prompt_ids).astype(np.float64)

    def acceptance_for_allocation(self, prompt_ids, laplace: bool) -> np.ndarray:
        if laplace:
            return laplace_smoothed_acceptance(self.get("accepted_ema_count", prompt_ids),
                                               self.get("sample_ema_count", prompt_ids))
        return self.acceptance_rate_of(prompt_ids)

    def expected_count_acceptance(self, prompt_ids) -> np.ndarray:
        """p̄ for RAFT++'s expected-count normaliser (`raft_expected_count_scale`), NaN for a prompt never
        seen: the Laplace-smoothed EMA counts (a + 1)/(m + 2), whatever the allocation reads.

        The normaliser divides a prompt's accepted samples by n·p̄. The raw EMA of p decays towards 0
        and never reaches it (a prompt accepted once, then missed ten visits: p̃ ≈ 1e-3), so a rare
        success was weighted ~1/(n·1e-3) and one draw dominated the gradient (benchmarks/README.md);
        (a + 1)/(m + 2) ≥ 1/(m + 2) bounds that weight by (m + 2)/n."""
        p = laplace_smoothed_acceptance(self.get("accepted_ema_count", prompt_ids), self.get("sample_ema_count", prompt_ids))
        return np.where(self.get("visit_count", prompt_ids) > 0, p, np.nan)

    def allocation_inputs(self, prompt_ids, laplace: bool) -> dict[str, np.ndarray]:
        """The keyword arguments of `online_gvm_allocation` for a batch: seen, p̃, G̃ and whether G̃ exists."""
        prompt_ids = self._unique_ids(prompt_ids)
        return {"seen": self.get("visit_count", prompt_ids) > 0,
                "acceptance_rate": self.acceptance_for_allocation(prompt_ids, laplace),
                "grad_norm": self.get("grad_norm_ema", prompt_ids).astype(np.float64),
                "has_grad_norm": self.get("grad_norm_count", prompt_ids) > 0}

    def summary(self) -> dict[str, float]:
        visited = self.visit_count[:self.size] > 0
        rates = self.acceptance_rate_ema[:self.size][visited]
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
        with_grad = self.grad_norm_count[:self.size] > 0
        if with_grad.any():
            summary["grad_norm_ema_mean"] = float(self.grad_norm_ema[:self.size][with_grad].mean())
        summary.update({f"acceptance_rate_ema_hist_{k}": float(count) for k, count in enumerate(histogram)})
        return summary

    # -- checkpoint -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Slot order: `prompt_ids[k]` is the id whose values sit at index k of every array."""
        state = {name: getattr(self, name)[:self.size].copy() for name in _ARRAYS}
        state["prompt_ids"] = self.slot_ids[:self.size].copy()
        state["ema_weight"] = np.array([self.ema_weight], dtype=np.float64)
        state["nonfinite_grad_norms"] = np.array([self.nonfinite_grad_norms], dtype=np.int64)
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.ema_weight = float(state["ema_weight"][0])
        self.nonfinite_grad_norms = int(state.get("nonfinite_grad_norms", np.zeros(1))[0])
        size = len(state["visit_count"])
        # Checkpoints written before slots existed indexed the arrays by prompt id.
        ids = np.asarray(state["prompt_ids"], dtype=np.int64) if "prompt_ids" in state else np.arange(size)
        self.size = 0
        self._sorted_ids = np.zeros(0, dtype=np.int64)
        self._sorted_slots = np.zeros(0, dtype=np.int64)
        self._reserve(size)
        for name in _ARRAYS:
            getattr(self, name)[:] = 0
        slots = self._slots(self._unique_ids(ids))
        for name in _ARRAYS:
            if name in state:
                getattr(self, name)[slots] = state[name]


class GroupStatistics(PromptStatistics):
    """The moving averages of groups of alike prompts (a difficulty level), keyed by `group_ids`, fed
    from the same batches as the prompts' own: a group's batch rate pools its prompts' counts, its G
    is the mean of its prompts' finite G. Prompt-level methods take group names (None: no group)."""

    def update_acceptance_of_groups(self, groups, accepted, samples) -> None:
        ids, group_accepted, group_samples = group_totals(group_ids(groups), accepted, samples)
        self.update_acceptance(ids, group_accepted, np.rint(group_samples).astype(np.int64))

    def update_grad_norms_of_groups(self, groups, grad_norms) -> None:
        self.update_grad_norms(*group_mean(group_ids(groups), grad_norms))

    def allocation_inputs_of_groups(self, groups, laplace: bool) -> dict[str, np.ndarray]:
        """`allocation_inputs` of each prompt's group; groups repeat, and a prompt with none reads as never seen."""
        ids = group_ids(groups)
        inputs = {"seen": np.zeros(ids.size, dtype=bool), "acceptance_rate": np.zeros(ids.size),
                  "grad_norm": np.zeros(ids.size), "has_grad_norm": np.zeros(ids.size, dtype=bool)}
        known = ids >= 0
        if known.any():
            unique, inverse = np.unique(ids[known], return_inverse=True)
            for key, values in self.allocation_inputs(unique, laplace).items():
                inputs[key][known] = values[inverse]
        return inputs
