"""Which steps' rollouts are in flight: the schedule of sync and async mode (DESIGN.md "One training
step"; issue "Throughput: asynchronous rollout and training with a staleness bound").

Weight version v is the learner after v updates; the generators load it right after step v.
Every call on an engine runs in the order it was submitted, so a rollout samples with the last
version published before it was launched. Step k, with `max_staleness` s:

    launch rollouts of steps up to k + s   (those not launched yet; version k−1 is published)
    collect step k's rollout                (launched at step k − s, sampled with version ≥ k−1−s)
    train on it, publish version k

s = 0 launches step k's rollout after version k−1 is published and waits for it: the synchronous
loop, call for call. s = 1 samples step k+1 with version k−1 while the learner trains step k, so
generation and training overlap and a sample lags the learner by at most one version; the loss
corrects for the lag with the sample's behaviour log-probs (`PolicyLearner`, §GRPO.3 ratio).

No Ray here, and no callback: the driver asks which steps to launch now (`to_launch`), launches
them itself (`add`) and takes step k's rollout back (`take`).
"""
from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

Launched = TypeVar("Launched")


class RolloutPipeline(Generic[Launched]):
    def __init__(self, max_staleness: int, last_step: int):
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.max_staleness = max_staleness
        self.last_step = last_step
        self.next_to_launch = 1
        self._in_flight: deque[tuple[int, Launched]] = deque()

    def to_launch(self, step: int) -> range:
        """The steps whose rollouts may go out before step `step` trains, not launched yet: up to
        step + max_staleness (and the last step). Launch them in order, each with `add`."""
        return range(self.next_to_launch, min(step + self.max_staleness, self.last_step) + 1)

    def add(self, step: int, launched: Launched) -> None:
        if step != self.next_to_launch:
            raise RuntimeError(f"rollouts are launched in step order: got step {step}, next is {self.next_to_launch}")
        self._in_flight.append((step, launched))
        self.next_to_launch += 1

    def take(self, step: int) -> Launched:
        """Step `step`'s rollout, launched earlier (or just now)."""
        launched_step, launched = self._in_flight.popleft()
        if launched_step != step:
            raise RuntimeError(f"rollouts are taken in step order: asked for step {step}, next is {launched_step}")
        return launched

    def pending(self) -> list[tuple[int, Launched]]:
        """(step, launched) of every rollout launched and not taken yet, in step order."""
        return list(self._in_flight)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)
