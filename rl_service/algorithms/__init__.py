"""Pure-torch RL algorithms of rl_service (no Ray): ALGORITHMS.md §GRPO and §RAFT."""

from rl_service.algorithms.advantages import (
    grpo_advantages,
    raft_plus_plus_advantages,
    raft_plus_plus_keep_mask,
    zero_variance_groups,
)
from rl_service.algorithms.logprobs import token_log_probs
from rl_service.algorithms.policy_loss import AGGREGATIONS, PolicyLossConfig, loss_normalizer_for, policy_loss

__all__ = [
    "AGGREGATIONS",
    "PolicyLossConfig",
    "grpo_advantages",
    "loss_normalizer_for",
    "policy_loss",
    "raft_plus_plus_advantages",
    "raft_plus_plus_keep_mask",
    "token_log_probs",
    "zero_variance_groups",
]
