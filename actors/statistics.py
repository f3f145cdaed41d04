"""StatisticsActor: per-prompt moving averages and the sample allocation for each batch."""
from __future__ import annotations

import numpy as np
import ray

from actors.process import configure_process
from rl_service.algorithms.gvm import allocation_spread_metrics, gvm_allocation, uniform_allocation
from rl_service.config import StatisticsConfig
from rl_service.statistics.prompt_stats import PromptStatistics


@ray.remote
class StatisticsActor:
    def __init__(self, config: StatisticsConfig):
        configure_process(1)
        self.config = config
        self.stats = PromptStatistics(ema_weight=config.ema_weight)
        self.last_allocation_metrics: dict[str, float] = {}

    def allocate(self, prompt_ids: list[int], budget: int) -> list[int]:
        """Samples per prompt for the next batch (ALGORITHMS.md §GVM.3–4 and §GVM.6, or uniform)."""
        config = self.config
        if config.allocation == "uniform":
            counts = np.asarray(uniform_allocation(len(prompt_ids), budget))
        else:
            counts = self.stats.gvm_allocate(prompt_ids, budget, alpha=config.alpha, beta=config.beta,
                                             n_min=config.n_min, n_max=config.n_max, n_pilot=config.n_pilot,
                                             laplace=config.laplace_smoothing)
        self._record_spread(prompt_ids, counts)
        return counts.tolist()

    def allocate_from_pilot(self, prompt_ids: list[int], acceptance: list[float], grad_norms: list[float],
                            budget: int) -> list[int]:
        """The paper's offline allocation (§GVM.5): p and G from this chunk's pilot only, no memory.

        A prompt whose pilot accepted nothing has p = 0 and so weight 0 (§GVM.4); G of such a prompt
        is irrelevant. Bounds stay the paper's (none) unless the config sets n_max.
        """
        grad = np.nan_to_num(np.asarray(grad_norms, dtype=np.float64), nan=0.0, posinf=0.0)
        counts = gvm_allocation(acceptance, grad, budget, alpha=self.config.alpha, beta=self.config.beta,
                                n_min=0, n_max=self.config.n_max)
        self._record_spread(prompt_ids, counts)
        return counts.tolist()

    def _record_spread(self, prompt_ids: list[int], counts: np.ndarray) -> None:
        acceptance = self.stats.acceptance_rate_of(prompt_ids)
        self.last_allocation_metrics = allocation_spread_metrics(counts, acceptance)

    def update_acceptance(self, prompt_ids: list[int], accepted: list[float], samples: list[int]) -> dict[str, float]:
        self.stats.update_acceptance(np.asarray(prompt_ids), np.asarray(accepted), np.asarray(samples))
        return {**self.stats.summary(), **self.last_allocation_metrics}

    def update_grad_norms(self, prompt_ids: list[int], grad_norms: list[float]) -> int:
        return self.stats.update_grad_norms(prompt_ids, grad_norms)

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.stats.state_dict()

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.stats.load_state_dict(state)
