"""Data parallelism over learner ranks: who computes which rows, and lock-step passes.

Every rank receives the whole batch of rollouts and computes the same advantages and the same
mini-batches (§GRPO.2 needs whole groups; the §GRPO.5 normaliser is the mini-batch's), then takes its
own share of each mini-batch's rows. The loss of each row is normalised by the *global* mini-batch
count, so the rank gradients *sum* to the one-rank gradient.

Lock step: ZeRO-2 reduces gradients in every backward and ZeRO-3 gathers parameters in every forward,
both collectives, so every rank must make the same number of passes. Each rank knows every rank's
share (the split is a pure function of the batch), so a rank with fewer micro-batches pads with
*idle* passes (a real row, loss × 0: zero gradient) without any communication.
No Ray here.
"""
from __future__ import annotations

from typing import Sequence

import torch


def shard_rows(rows: torch.Tensor, lengths: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    """Each rank's rows of `rows`. One rank: `rows` as they are. Several: longest first, dealt round
    robin, so every rank gets nearly the same number of rows and of tokens."""
    if world_size == 1:
        return [rows]
    order = rows[torch.sort(lengths[rows], descending=True, stable=True).indices]
    return [order[rank::world_size] for rank in range(world_size)]


def lock_step(per_rank: Sequence[list[torch.Tensor]], rank: int) -> list[torch.Tensor | None]:
    """`rank`'s micro-batches, padded with None (an idle pass) to the most any rank has."""
    most = max((len(micro) for micro in per_rank), default=0)
    mine = list(per_rank[rank])
    return mine + [None] * (most - len(mine))


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks in place (a no-op for one rank)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_metrics(totals: dict[str, float], summed: Sequence[str]) -> dict[str, float]:
    """`totals` with the keys in `summed` added up over the ranks (every rank has the same keys)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return totals
    keys = sorted(key for key in totals if key in summed)
    values = all_reduce_sum_(torch.tensor([totals[key] for key in keys], dtype=torch.float64))
    return {**totals, **dict(zip(keys, values.tolist()))}


def all_gather_floats(value: float) -> list[float]:
    """One number from every rank, in rank order ([value] for one rank)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, torch.tensor([value], dtype=torch.float64))
    return [float(item) for item in gathered]


def sum_gradients_(parameters: Sequence[torch.nn.Parameter]) -> None:
    """ZeRO 0 on several ranks: sum the ranks' gradients in place, in one flat buffer, before the
    norm is taken (DeepSpeed would average them inside step(), after our clip and NaN check)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for parameter in parameters:
        if parameter.grad is None:   # a rank whose rows never reached a parameter still sends zeros
            parameter.grad = torch.zeros_like(parameter)
    grads = [parameter.grad for parameter in parameters]
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()
