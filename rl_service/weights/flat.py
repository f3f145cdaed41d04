"""Weights as one flat byte buffer plus a table of contents (DESIGN.md "Weight sync", CPU transport).

The learner packs every parameter into one contiguous buffer, so publishing is a single `ray.put`
and each generator reads it zero-copy from the object store and copies tensor by tensor into its
model in place. Bytes rather than one float dtype, so bf16 and mixed-dtype models travel as they are.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch


@dataclass
class FlatWeights:
    version: int
    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[str]
    offsets: list[int]          # byte offset of each tensor in `buffer`
    buffer: np.ndarray          # uint8, all tensors back to back

    @property
    def num_bytes(self) -> int:
        return int(self.buffer.nbytes)

    def tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        """(name, tensor view into the buffer); the views share memory with the buffer."""
        for name, shape, dtype_name, offset in zip(self.names, self.shapes, self.dtypes, self.offsets):
            yield name, _tensor_from_bytes(self.buffer, dtype_name, shape, offset)


def _tensor_from_bytes(array: np.ndarray, dtype_name: str, shape, offset: int = 0) -> torch.Tensor:
    dtype = getattr(torch, dtype_name)
    count = int(np.prod(shape)) if shape else 1
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # Object-store buffers are read-only; these views are only ever read from.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(array, dtype=dtype, count=count, offset=offset).view(shape)


@dataclass
class WeightViews:
    """A bucket as byte views of the learner's own tensors: no packing copy. Ray's serialiser copies
    each array into the object store once (out of band), and a generator reads them back zero-copy,
    so the object-store transport costs one copy in and one copy out per generator (measured in
    benchmarks/weight_sync.py: packing first cost a third copy and a fresh buffer's page faults)."""
    version: int
    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[str]
    arrays: list[np.ndarray]    # uint8, one per tensor

    @property
    def num_bytes(self) -> int:
        return int(sum(array.nbytes for array in self.arrays))

    def tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        for name, shape, dtype_name, array in zip(self.names, self.shapes, self.dtypes, self.arrays):
            yield name, _tensor_from_bytes(array, dtype_name, shape)


def tensor_views(named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> WeightViews:
    """`WeightViews` of CPU tensors (views, valid while the tensors are); other devices are copied."""
    items = [(name, tensor.detach().to("cpu").contiguous()) for name, tensor in named_tensors]
    return WeightViews(
        version=version, names=[name for name, _ in items], shapes=[tuple(t.shape) for _, t in items],
        dtypes=[str(t.dtype).removeprefix("torch.") for _, t in items],
        arrays=[t.reshape(-1).view(torch.uint8).numpy() for _, t in items])


@dataclass
class PublishedWeights:
    """One weight version as the object-store transport publishes it: the refs of its flat buckets,
    each `ray.put` once by the learner (opaque here: rl_service/weights has no Ray)."""
    version: int
    bucket_refs: list
    num_bytes: int


def named_tensors_of(buckets: Sequence[FlatWeights | WeightViews]) -> list[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of one version's buckets, in order; refuses a mix of versions."""
    versions = {bucket.version for bucket in buckets}
    if len(versions) > 1:
        raise ValueError(f"weight buckets of different versions {sorted(versions)} in one load")
    return [item for bucket in buckets for item in bucket.tensors()]


def plan_buckets(named_sizes: Iterable[tuple[str, int]], bucket_bytes: int) -> list[list[str]]:
    """Names grouped, in order, into buckets of at most `bucket_bytes` (a larger tensor alone)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {bucket_bytes} bytes")
    buckets: list[list[str]] = []
    filled = bucket_bytes
    for name, size in named_sizes:
        if filled + size > bucket_bytes and (not buckets or buckets[-1]):
            buckets.append([])
            filled = 0
        buckets[-1].append(name)
        filled += size
    return buckets


def packed_offsets(sizes: Iterable[tuple[int, int]]) -> tuple[list[int], int]:
    """Byte offsets of tensors of (element count, element size) packed back to back, each aligned
    to its element size (`frombuffer` needs that), and the total bytes: the layout of `FlatWeights`."""
    offsets, cursor = [], 0
    for count, element_size in sizes:
        cursor = (cursor + element_size - 1) // element_size * element_size
        offsets.append(cursor)
        cursor += count * element_size
    return offsets, cursor


def flatten_named_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> FlatWeights:
    items = [(name, tensor.detach().to("cpu").contiguous()) for name, tensor in named_tensors]
    offsets, cursor = packed_offsets((tensor.numel(), tensor.element_size()) for _, tensor in items)
    buffer = np.empty(cursor, dtype=np.uint8)
    for (_, tensor), offset in zip(items, offsets):
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes:
            buffer[offset:offset + nbytes] = tensor.view(-1).view(torch.uint8).numpy()
    return FlatWeights(
        version=version, names=[name for name, _ in items], shapes=[tuple(t.shape) for _, t in items],
        dtypes=[str(t.dtype).removeprefix("torch.") for _, t in items], offsets=offsets, buffer=buffer)


@torch.no_grad()
def load_flat_weights_(model: torch.nn.Module, flat) -> None:
    """Copy every tensor of `flat` (one bucket, `FlatWeights` or `WeightViews`, or one version's
    buckets) into the same-named parameter of `model`, in place."""
    named = named_tensors_of(list(flat) if isinstance(flat, (list, tuple)) else [flat])
    parameters = dict(model.named_parameters())
    missing = [name for name, _ in named if name not in parameters]
    if missing:
        raise KeyError(f"published weights name parameters the model lacks: {missing[:5]}")
    for name, tensor in named:
        copy_into_(parameters[name], tensor)


@torch.no_grad()
def copy_into_(target: torch.Tensor, source: torch.Tensor) -> None:
    """`target.copy_(source)`, as one `memcpy` where both are contiguous CPU tensors of one dtype and
    shape: torch's copy on the one thread an engine has runs at half memcpy's bandwidth (measured:
    400 MB in 64 ms against 34 ms), and loading weights is all copying."""
    if (target.device.type == source.device.type == "cpu" and target.dtype == source.dtype
            and target.shape == source.shape and target.is_contiguous() and source.is_contiguous()
            and target.numel() > 0):
        np.copyto(target.detach().reshape(-1).view(torch.uint8).numpy(),
                  source.reshape(-1).view(torch.uint8).numpy())
    else:
        target.copy_(source)
