"""StatisticsActor: per-prompt moving averages and the sample allocation for each batch.

The allocation policies are pure functions of `rl_service.algorithms.gvm` (§GVM.3–6); this role
stores the moving averages they read. Each allocation returns its spread metrics with its counts,
so the driver logs them on the step that trains those counts (in async mode the next allocation
happens before this step's statistics come back). With `statistics.unseen_prompts: group` it also
keeps the moving averages of each group of alike prompts (a difficulty level), folded in from the
same batches, for the prompts it has never seen.
"""
from __future__ import annotations

import numpy as np
import ray

from actors.process import configure_process
from rl_service.algorithms.gvm import (allocation_spread_metrics, gvm_allocation, online_gvm_allocation,
                                       uniform_allocation)
from rl_service.config import StatisticsConfig
from rl_service.statistics.prompt_stats import GroupStatistics, PromptStatistics


_GROUP = "group."   # checkpoint key prefix of the group statistics


@ray.remote
class StatisticsActor:
    def __init__(self, config: StatisticsConfig):
        configure_process(1)
        self.config = config
        self.stats = PromptStatistics(ema_weight=config.ema_weight)
        self.groups = GroupStatistics(ema_weight=config.ema_weight) if config.unseen_prompts == "group" else None

    def allocate(self, prompt_ids: list[int], budget: int,
                 groups: list[str | None] | None = None) -> tuple[list[int], dict[str, float]]:
        """Samples per prompt for the next batch (§GVM.6 online policy, or uniform), and its spread.
        `groups[i]` names the group of `prompt_ids[i]` (None: no group)."""
        config = self.config
        if config.allocation == "uniform":
            counts = np.asarray(uniform_allocation(len(prompt_ids), budget))
        else:
            group = (None if self.groups is None or groups is None else
                     self.groups.allocation_inputs_of_groups(groups, config.laplace_smoothing))
            counts = online_gvm_allocation(**self.stats.allocation_inputs(prompt_ids, config.laplace_smoothing),
                                           budget=budget, alpha=config.alpha, beta=config.beta, n_min=config.n_min,
                                           n_max=config.n_max, n_pilot=config.n_pilot, group=group)
        return counts.tolist(), self._spread(prompt_ids, counts)

    def allocate_from_pilot(self, prompt_ids: list[int], acceptance: list[float], grad_norms: list[float],
                            budget: int, n_max: int | None = None) -> tuple[list[int], dict[str, float]]:
        """GVM on a pilot's p and G alone, no memory (§GVM.5; the step pilot uses it for the rest of a step).

        A prompt whose pilot accepted nothing has p = 0 and so weight 0 (§GVM.4); G of such a prompt
        is irrelevant. No lower bound; `n_max` (default `statistics.n_max`) caps each prompt.
        """
        grad = np.nan_to_num(np.asarray(grad_norms, dtype=np.float64), nan=0.0, posinf=0.0)
        cap = self.config.n_max if n_max is None else n_max
        if cap is not None and cap * len(prompt_ids) < budget:
            cap = None   # the cap cannot hold the budget: §GVM.4's unbounded rule
        counts = gvm_allocation(acceptance, grad, budget, alpha=self.config.alpha, beta=self.config.beta,
                                n_min=0, n_max=cap)
        return counts.tolist(), self._spread(prompt_ids, counts, acceptance)

    def _spread(self, prompt_ids: list[int], counts: np.ndarray, acceptance=None) -> dict[str, float]:
        if acceptance is None:
            acceptance = self.stats.acceptance_rate_of(prompt_ids)
        return allocation_spread_metrics(counts, acceptance)

    def acceptance_estimates(self, prompt_ids: list[int]) -> list[float]:
        """p̄ of each prompt for RAFT++'s expected-count normaliser, NaN for a prompt never seen
        (`PromptStatistics.expected_count_acceptance`)."""
        return self.stats.expected_count_acceptance(prompt_ids).tolist()

    def update_acceptance(self, prompt_ids: list[int], accepted: list[int], samples: list[int],
                          groups: list[str | None] | None = None) -> dict[str, float]:
        """Fold in a step's accepted counts (`rl_service.algorithms.acceptance`); returns the summary."""
        self.stats.update_acceptance(np.asarray(prompt_ids), np.asarray(accepted), np.asarray(samples))
        if self.groups is not None and groups is not None:
            self.groups.update_acceptance_of_groups(groups, accepted, samples)
        return self.stats.summary()

    def update_grad_norms(self, prompt_ids: list[int], grad_norms: list[float],
                          groups: list[str | None] | None = None) -> int:
        if self.groups is not None and groups is not None:
            self.groups.update_grad_norms_of_groups(groups, grad_norms)
        return self.stats.update_grad_norms(prompt_ids, grad_norms)

    def state_dict(self) -> dict[str, np.ndarray]:
        state = self.stats.state_dict()
        if self.groups is not None:
            state.update({f"{_GROUP}{key}": value for key, value in self.groups.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.stats.load_state_dict({key: value for key, value in state.items() if not key.startswith(_GROUP)})
        group_state = {key[len(_GROUP):]: value for key, value in state.items() if key.startswith(_GROUP)}
        if self.groups is not None and group_state:
            self.groups.load_state_dict(group_state)
