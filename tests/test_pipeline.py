"""The rollout schedule of sync and async mode (rl_service/pipeline.py), without Ray."""
from __future__ import annotations

import pytest

from rl_service.pipeline import RolloutPipeline


def _trace(max_staleness: int, steps: int) -> list[tuple]:
    """Events in order: ("launch", step) when a rollout is launched, ("train", step) when trained."""
    events: list[tuple] = []

    def launch(step: int) -> str:
        events.append(("launch", step))
        return f"rollout {step}"

    pipeline = RolloutPipeline(launch, max_staleness, last_step=steps)
    for step in range(1, steps + 1):
        assert pipeline.take(step) == f"rollout {step}"
        events.append(("train", step))
    return events


def test_staleness_zero_is_the_synchronous_loop():
    assert _trace(0, 3) == [("launch", 1), ("train", 1), ("launch", 2), ("train", 2), ("launch", 3), ("train", 3)]


@pytest.mark.parametrize("max_staleness", [1, 2, 3])
def test_each_rollout_is_launched_at_most_max_staleness_updates_before_it_trains(max_staleness):
    steps = 6
    events = _trace(max_staleness, steps)
    assert [step for kind, step in events if kind == "launch"] == list(range(1, steps + 1))   # each once, in order
    for step in range(1, steps + 1):
        launched_at = events.index(("launch", step))
        updates_since_launch = sum(1 for kind, trained in events[launched_at:] if kind == "train" and trained < step)
        # Version published when it launched: (updates so far); trained by version step − 1.
        assert updates_since_launch == min(max_staleness, step - 1)
    # Nothing is launched beyond the last step.
    assert events[-1] == ("train", steps) and ("launch", steps + 1) not in events


def test_rollouts_are_taken_in_step_order():
    pipeline = RolloutPipeline(lambda step: step, 1, last_step=5)
    pipeline.take(1)
    assert pipeline.in_flight == 1
    with pytest.raises(RuntimeError, match="step order"):
        pipeline.take(3)


def test_negative_staleness_is_refused():
    with pytest.raises(ValueError, match="max_staleness"):
        RolloutPipeline(lambda step: step, -1, last_step=2)
