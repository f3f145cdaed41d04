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


def split_requests(requests: Sequence[GenerationRequest], num_shards: int) -> list[list[GenerationRequest]]:
    """Contiguous shards with sample counts as even as possible, order kept (deterministic)."""
    total = sum(request.num_samples for request in requests)
    shards: list[list[GenerationRequest]] = [[] for _ in range(num_shards)]
    cumulative = 0
    for request in requests:
        # Assign by the midpoint of the request's samples so shards carry ~total/num_shards samples.
        midpoint = cumulative + request.num_samples / 2
        shard = min(int(midpoint * num_shards / max(total, 1)), num_shards - 1)
        shards[shard].append(request)
        cumulative += request.num_samples
    return [shard for shard in shards if shard]
