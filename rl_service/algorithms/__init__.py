"""Pure RL algorithms of rl_service (no Ray): ALGORITHMS.md §GRPO, §RAFT, §GVM, §DAPO, §DPO, §BVPO.

The torch-based names below load on first use, so the numpy-only modules (GVM allocation,
acceptance, dynamic sampling) and the statistics role import without torch. The loss function
`policy_loss` shares its name with its module: import it from `rl_service.algorithms.policy_loss`.
"""
from importlib import import_module

_LAZY = {
    "grpo_advantages": "advantages",
    "raft_plus_plus_advantages": "advantages",
    "raft_plus_plus_keep_mask": "advantages",
    "zero_variance_groups": "advantages",
    "token_log_probs": "logprobs",
    "AGGREGATIONS": "policy_loss",
    "PolicyLossConfig": "policy_loss",
    "loss_normalizer_for": "policy_loss",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"rl_service.algorithms.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'rl_service.algorithms' has no attribute {name!r}")
