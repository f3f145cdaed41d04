"""DAPO dynamic sampling, ALGORITHMS.md §DAPO (pure numpy, no Ray, no torch).

A GRPO group whose rewards are all equal has advantage 0 and no policy gradient. Dynamic sampling
drops such groups and samples more prompts until the batch holds the target number of groups with a
reward spread, or a cap on rounds is reached; the batch then trains on the first `target` groups with
a spread, in the order they were drawn (DAPO keeps exactly the batch size). Every generated sample is
counted in the step's cost, the dropped ones included.
"""
from __future__ import annotations

import numpy as np


def groups_with_spread(rewards, request_index, num_prompts: int) -> np.ndarray:
    """bool [num_prompts]: the prompt has >= 2 samples and not all of its rewards are equal."""
    rewards = np.asarray(rewards, dtype=np.float64)
    index = np.asarray(request_index, dtype=np.int64)
    if rewards.shape != index.shape:
        raise ValueError(f"{rewards.size} rewards for {index.size} request indices")
    size = np.bincount(index, minlength=num_prompts)
    low = np.full(num_prompts, np.inf)
    high = np.full(num_prompts, -np.inf)
    np.minimum.at(low, index, rewards)
    np.maximum.at(high, index, rewards)
    return (size >= 2) & (high > low)


def selected_groups(spread, target: int) -> np.ndarray:
    """bool mask of the first `target` prompts with a spread (all of them when there are fewer)."""
    spread = np.asarray(spread, dtype=bool)
    chosen = np.zeros(spread.size, dtype=bool)
    chosen[np.flatnonzero(spread)[:target]] = True
    return chosen


def selected_samples(spread, group_sizes, target_samples: int) -> np.ndarray:
    """bool mask of the first prompts with a spread, in draw order, until their samples reach
    `target_samples` (the group that reaches it included; all of them when there are fewer)."""
    spread = np.asarray(spread, dtype=bool)
    sizes = np.asarray(group_sizes, dtype=np.int64)
    if sizes.shape != spread.shape:
        raise ValueError(f"{sizes.size} group sizes for {spread.size} groups")
    candidates = np.flatnonzero(spread)
    before = np.concatenate([[0], np.cumsum(sizes[candidates])[:-1]])   # samples already chosen ahead of each
    chosen = np.zeros(spread.size, dtype=bool)
    chosen[candidates[before < target_samples]] = True
    return chosen


def train_mask(request_index, chosen) -> list[bool]:
    """Per sample: whether its prompt's group was chosen."""
    return np.asarray(chosen, dtype=bool)[np.asarray(request_index, dtype=np.int64)].tolist()
