"""The data cursor: which prompts the next training batch takes.

Each epoch visits every prompt once in an order drawn from (seed, epoch), so the order can be
rebuilt from the cursor alone after a restart; the cursor is two integers and goes in checkpoints.
"""
from __future__ import annotations

import numpy as np


class PromptSampler:
    def __init__(self, num_prompts: int, batch_size: int, seed: int):
        if num_prompts < 1:
            raise ValueError("num_prompts must be >= 1")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.num_prompts = num_prompts
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts)

    def next_batch(self) -> list[int]:
        """Indices (into the dataset list) of the next batch; an epoch boundary wraps into the next order."""
        picked: list[int] = []
        while len(picked) < self.batch_size:
            take = min(self.batch_size - len(picked), self.num_prompts - self.position)
            picked.extend(int(i) for i in self._order[self.position:self.position + take])
            self.position += take
            if self.position == self.num_prompts:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
        return picked

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_prompts": self.num_prompts}

    def load_state_dict(self, state: dict) -> None:
        if state["num_prompts"] != self.num_prompts or state["seed"] != self.seed:
            raise ValueError("sampler state belongs to another dataset or seed")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self.epoch)
