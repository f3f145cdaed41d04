"""What "accepted" means, once for the whole service (ALGORITHMS.md §GVM.1).

A sample is accepted when the verifier says it is correct (a verifier scores 1 for correct, 0 for
wrong), or, under a custom reward or a reward model, when its reward is at least
`statistics.accept_threshold`. The statistics role's acceptance rates, the §GVM.1 gradient norms,
the offline pilot, RAFT++'s advantages (§RAFT) and the `accepted_fraction` metric all use
:func:`accepted`; never the mean reward (a reward above 1 would make a "rate" above 1).
"""
from __future__ import annotations

import numpy as np

VERIFIER_CORRECT = 1.0   # what every built-in verifier scores a correct completion


def acceptance_threshold(config) -> float:
    """The reward at and above which a sample counts as accepted, for a `JobConfig`.

    `statistics.accept_threshold` when set; else the verifier's "correct" score (1.0). A job whose
    acceptance drives training under a custom reward must set the threshold (the config refuses it
    otherwise, `JobConfig._acceptance_is_defined`)."""
    threshold = config.statistics.accept_threshold
    return VERIFIER_CORRECT if threshold is None else float(threshold)


def accepted(rewards, threshold: float = VERIFIER_CORRECT):
    """bool per sample: ``reward >= threshold``; works on numpy arrays, lists and torch tensors alike."""
    if hasattr(rewards, "dtype") and not isinstance(rewards, np.ndarray):   # a torch tensor stays one
        return rewards >= threshold
    return np.asarray(rewards, dtype=np.float64) >= threshold


def accepted_per_prompt(rewards, request_index, num_prompts: int, threshold: float = VERIFIER_CORRECT) -> np.ndarray:
    """Accepted samples of each prompt (int64 [num_prompts]); `request_index[k]` is sample k's prompt."""
    index = np.asarray(request_index, dtype=np.int64)
    return np.bincount(index, weights=accepted(rewards, threshold), minlength=num_prompts).astype(np.int64)
