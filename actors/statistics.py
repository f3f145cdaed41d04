"""StatisticsActor: per-prompt moving averages and the sample allocation for each batch."""
from __future__ import annotations

import numpy as np
import ray

from actors.process import configure_process
from rl_service.statistics.prompt_stats import PromptStatistics, uniform_allocation


@ray.remote
class StatisticsActor:
    def __init__(self, ema_weight: float, allocation: str):
        configure_process(1)
        self.stats = PromptStatistics(ema_weight=ema_weight)
        self.allocation = allocation

    def allocate(self, prompt_ids: list[int], budget: int) -> list[int]:
        if self.allocation != "uniform":
            raise ValueError(f"unknown allocation {self.allocation!r}")
        return uniform_allocation(len(prompt_ids), budget)

    def update_acceptance(self, prompt_ids: list[int], accepted: list[float], samples: list[int]) -> dict[str, float]:
        self.stats.update_acceptance(np.asarray(prompt_ids), np.asarray(accepted), np.asarray(samples))
        return self.stats.summary()

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.stats.state_dict()

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.stats.load_state_dict(state)
