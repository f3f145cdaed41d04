"""The object-store weight transport's learner side (DESIGN.md "Weight sync", CPU): each flat bucket
is `ray.put` once as it is made, so a rank holds one bucket at a time, not the model; every generator
then reads the buckets zero-copy from its node's object store and loads them in place."""
from __future__ import annotations

from typing import Iterable

import ray

from rl_service.weights.flat import FlatWeights, PublishedWeights, WeightViews


def put_buckets(buckets: Iterable[FlatWeights | WeightViews], version: int, rank: int = 0) -> PublishedWeights | None:
    refs, num_bytes = [], 0
    for bucket in buckets:   # only rank 0 gets buckets; others run the loop for ZeRO-3's gathers
        num_bytes += bucket.num_bytes
        refs.append(ray.put(bucket))
    return PublishedWeights(version=version, bucket_refs=refs, num_bytes=num_bytes) if rank == 0 else None
