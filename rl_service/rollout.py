"""What moves between roles in a step: generation requests and the samples they produce.

Plain dataclasses of lists and numpy arrays (cheap to serialise through Ray's object store); no
tensors, no Ray. `request_index` ties each sample to its prompt's position in the step's batch,
which is also its GRPO group.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    request_index: int          # position of the prompt in this step's batch (= its group)
    prompt_id: int              # stable dataset id
    prompt_token_ids: list[int]
    num_samples: int


@dataclass
class Rollout:
    """Samples in request order; sample k belongs to request `request_index[k]`."""
    request_index: list[int] = field(default_factory=list)
    prompt_token_ids: list[list[int]] = field(default_factory=list)
    completion_token_ids: list[list[int]] = field(default_factory=list)
    behaviour_logprobs: list[np.ndarray] = field(default_factory=list)   # float32, one per completion token
    completion_texts: list[str] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)                  # ended with EOS (not truncated)
    weight_versions: list[int] = field(default_factory=list)            # version that produced each sample

    def __len__(self) -> int:
        return len(self.request_index)

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.completion_token_ids)

    @staticmethod
    def concat(parts: Sequence["Rollout"]) -> "Rollout":
        merged = Rollout()
        for part in parts:
            for name in merged.__dataclass_fields__:
                getattr(merged, name).extend(getattr(part, name))
        return merged


def step_seed(seed: int, step: int, purpose: int) -> int:
    """The sampling seed of one phase of one step: a run with the same seed replays bit for bit."""
    return (seed * 1_000_003 + step * 7_919 + purpose) % (2**31 - 1)


def request_work(request: GenerationRequest, max_new_tokens: int = 1) -> int:
    """A request's generation work: samples × max new tokens (an upper bound, known before it runs)."""
    return request.num_samples * max_new_tokens


def balance_requests(requests: Sequence[GenerationRequest], outstanding: Sequence[int],
                     max_new_tokens: int = 1) -> list[tuple[int, list[GenerationRequest]]]:
    """Assign contiguous runs of requests to engines so that every engine ends as equally loaded as
    whole requests allow, counting the work each still has outstanding (samples × max tokens sent
    and not yet returned). Pure and deterministic.

    Returns `(engine index, shard)` pairs in request order: the concatenation of the shards is
    `requests`, as given, and no shard is empty (an engine given nothing is left out). Zero-sample
    requests stay in the shard of their position. Water-filling: engines below the level `L` at which
    `Σ max(0, L - outstanding_e)` equals the new work each get `L - outstanding_e`, in engine order;
    a request goes to the engine whose slice holds the midpoint of its work. With nothing
    outstanding this is an even split of the samples.
    """
    num_engines = len(outstanding)
    if num_engines < 1:
        raise ValueError("balance_requests needs at least one engine")
    if any(work < 0 for work in outstanding) or max_new_tokens < 1:
        raise ValueError("outstanding work must be >= 0 and max_new_tokens >= 1")
    requests = list(requests)
    if not requests:
        return []
    works = [request_work(request, max_new_tokens) for request in requests]
    total = sum(works)
    if total == 0:   # nothing to generate: one shard, to the least-loaded engine
        return [(min(range(num_engines), key=lambda e: (outstanding[e], e)), requests)]
    # Water level: the fewest least-loaded engines whose level L stays below the next engine's load.
    by_load = sorted(range(num_engines), key=lambda e: (outstanding[e], e))
    filled = by_load[:1]
    for engine in by_load[1:]:
        level_times_k = total + sum(outstanding[e] for e in filled)   # L × len(filled)
        if level_times_k <= outstanding[engine] * len(filled):
            break
        filled.append(engine)
    k = len(filled)
    level_times_k = total + sum(outstanding[e] for e in filled)
    receivers = sorted(filled)            # engine order, for a deterministic layout
    # Upper edges of each receiver's slice of [0, total), scaled by k to stay in integers.
    edges, edge = [], 0
    for engine in receivers:
        edge += level_times_k - k * outstanding[engine]
        edges.append(edge)
    shards: list[list[GenerationRequest]] = [[] for _ in receivers]
    cumulative, slot = 0, 0
    for request, work in zip(requests, works):
        midpoint_2k = (2 * cumulative + work) * k       # 2k × the midpoint of this request's work
        while slot < len(receivers) - 1 and midpoint_2k >= 2 * edges[slot]:
            slot += 1
        shards[slot].append(request)
        cumulative += work
    return [(engine, shard) for engine, shard in zip(receivers, shards) if shard]

