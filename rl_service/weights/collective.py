"""The collective weight transport (DESIGN.md "Weight sync", GPU): learner rank 0 broadcasts flat
buckets over a process group of its own with every engine worker; no object store, no per-tensor
round trips. NCCL between GPUs; the same code runs over gloo on CPU, which is how it is tested here.

The group is separate from the learner ranks' default group (made directly from a TCPStore, as
vLLM's stateless groups are): rank 0 is the learner, ranks 1.. the engine workers. What travels is
only bytes: both sides know the bucket layout (`BucketLayout`, sent once through Ray), so each
bucket is one broadcast into a preallocated buffer, and the receiver views its tensors in place.
No Ray here.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, Iterator

import torch

from rl_service.training.rendezvous import rendezvous_store
from rl_service.weights.flat import FlatWeights, packed_offsets


@dataclass(frozen=True)
class BucketLayout:
    """One bucket's table of contents: what `FlatWeights` holds besides its bytes."""
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    offsets: tuple[int, ...]
    num_bytes: int

    @staticmethod
    def of(flat: FlatWeights) -> "BucketLayout":
        return BucketLayout(tuple(flat.names), tuple(tuple(shape) for shape in flat.shapes), tuple(flat.dtypes),
                            tuple(flat.offsets), flat.num_bytes)

    @staticmethod
    def plan(entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]]) -> "BucketLayout":
        """The layout `flatten_named_tensors` gives tensors of these (name, shape, dtype), worked out
        from the shapes alone: nothing is packed or gathered to learn it."""
        entries = [(name, tuple(int(size) for size in shape), dtype) for name, shape, dtype in entries]
        sizes = [(int(torch.Size(shape).numel()), torch.empty((), dtype=dtype).element_size())
                 for _, shape, dtype in entries]
        offsets, num_bytes = packed_offsets(sizes)
        return BucketLayout(tuple(name for name, _, _ in entries), tuple(shape for _, shape, _ in entries),
                            tuple(str(dtype).removeprefix("torch.") for _, _, dtype in entries),
                            tuple(offsets), num_bytes)

    def views(self, buffer: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) views into a uint8 `buffer` holding this bucket's bytes."""
        named = []
        for name, shape, dtype_name, offset in zip(self.names, self.shapes, self.dtypes, self.offsets):
            dtype = getattr(torch, dtype_name)
            count = 1
            for size in shape:
                count *= size
            nbytes = count * torch.empty((), dtype=dtype).element_size()
            named.append((name, buffer[offset:offset + nbytes].view(dtype).view(shape)))
        return named


class WeightBroadcastGroup:
    """One member of the learner-engines group. `rank` 0 sends, the others receive."""

    def __init__(self, master_addr: str, master_port: int, rank: int, world_size: int,
                 device: str = "cpu", timeout_s: float = 300.0):
        import torch.distributed as dist

        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        timeout = timedelta(seconds=timeout_s)
        store = rendezvous_store(master_addr, master_port, world_size, rank == 0, timeout)  # served on master_addr only
        if self.device.type == "cuda":
            self.group = dist.ProcessGroupNCCL(store, rank, world_size)
        else:
            self.group = dist.ProcessGroupGloo(store, rank, world_size, timeout)

    def _broadcast(self, buffer: torch.Tensor) -> None:
        import torch.distributed as dist

        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.group.broadcast([buffer], options).wait()

    def send(self, buckets: Iterable[FlatWeights]) -> int:
        """Rank 0: broadcast every bucket, in order; returns the bytes sent."""
        sent = 0
        for bucket in buckets:
            buffer = torch.from_numpy(bucket.buffer).to(self.device, non_blocking=True)
            self._broadcast(buffer)
            sent += bucket.num_bytes
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return sent

    def receive(self, layouts: Iterable[BucketLayout]) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Ranks 1..: each bucket's (name, tensor) views, received in place; a view is valid until
        the next bucket is asked for (load it first)."""
        for layout in layouts:
            buffer = torch.empty(layout.num_bytes, dtype=torch.uint8, device=self.device)
            self._broadcast(buffer)
            yield layout.views(buffer)
