"""The learner's side of weight sync (DESIGN.md "Weight sync"): rank 0 holds one publisher, made when
the job starts, that turns a version's buckets into what every generator loads. The other ranks
only take part in ZeRO-3's gathers of each bucket (`drain`). One `publish(buckets, version)` per
transport; the driver's side is rl_service/driver/weight_sync.py, the generators' `GeneratorActor.load_weights`.

- `ObjectStorePublisher` (any hardware): each bucket `ray.put` once as it is made, so rank 0 holds one
  bucket at a time, not the model; generators read them zero-copy from their node's object store.
- `MailboxPublisher` (one node, CPU): each version copied into the free slot of a /dev/shm mailbox
  that the learner and every engine keep mapped (rl_service/weights/shared_memory.py).
- `BroadcastPublisher` (GPUs; gloo on CPU): each bucket broadcast from rank 0 to the engine workers
  over their own process group (rl_service/weights/collective.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import ray

from rl_service.weights.flat import FlatWeights, PublishedWeights, WeightViews
from rl_service.weights.shared_memory import MailboxWeights, WeightMailbox


@dataclass
class BroadcastWeights:
    """A version sent by broadcast. The learner returns it with the bytes it sent; the driver hands
    engines one with `layouts_ref`, where they find the bucket layouts to receive into."""
    version: int
    num_bytes: int = 0
    layouts_ref: object = None


def drain(buckets: Iterable) -> None:
    """A rank > 0: run every bucket's ZeRO-3 gather (they are collectives) and publish nothing."""
    for _ in buckets:
        pass


class ObjectStorePublisher:
    packed = False   # views of the parameters: Ray's serialiser copies each once into the store

    def publish(self, buckets: Iterable[FlatWeights | WeightViews], version: int) -> PublishedWeights:
        refs, num_bytes = [], 0
        for bucket in buckets:
            num_bytes += bucket.num_bytes
            refs.append(ray.put(bucket))
        return PublishedWeights(version=version, bucket_refs=refs, num_bytes=num_bytes)


class MailboxPublisher:
    packed = False   # views, copied straight into the mailbox slot

    def __init__(self, mailbox: WeightMailbox):
        self.mailbox = mailbox
        self.node_id = ray.get_runtime_context().get_node_id()

    def where(self) -> tuple[str, str, object]:
        """(path, node id, layout): what a reader needs to map the mailbox."""
        return str(self.mailbox.path), self.node_id, self.mailbox.layout

    def publish(self, buckets: Iterable[WeightViews], version: int) -> MailboxWeights:
        # Each bucket's views are valid until the next one is gathered: consumed in order.
        slot = self.mailbox.write(((name, array) for bucket in buckets
                                   for name, array in zip(bucket.names, bucket.arrays)), version)
        layout = self.mailbox.layout
        return MailboxWeights(path=str(self.mailbox.path), node_id=self.node_id, slot=slot, version=version,
                              num_bytes=layout.num_bytes, layout=layout)

    def close(self) -> None:
        """Remove the mailbox file (engines that still map it keep their mapping)."""
        self.mailbox.close()


class BroadcastPublisher:
    packed = True    # one flat buffer per bucket: one broadcast each

    def __init__(self, group):
        self.group = group

    def publish(self, buckets: Iterable[FlatWeights], version: int) -> BroadcastWeights:
        return BroadcastWeights(version=version, num_bytes=self.group.send(buckets))
