"""The rollout schedule of sync and async mode (rl_service/driver/pipeline.py), without Ray."""
from __future__ import annotations

import pytest

from rl_service.driver.pipeline import RolloutPipeline


def _trace(max_staleness: int, steps: int) -> list[tuple]:
    """Events in order: ("launch", step) when a rollout is launched, ("train", step) when trained."""
    events: list[tuple] = []

    pipeline = RolloutPipeline(max_staleness, last_step=steps)
    for step in range(1, steps + 1):
        for ahead in pipeline.to_launch(step):   # what the driver does at the start of a step
            events.append(("launch", ahead))
            pipeline.add(ahead, f"rollout {ahead}")
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


def test_rollouts_are_launched_and_taken_in_step_order():
    pipeline = RolloutPipeline(1, last_step=5)
    assert list(pipeline.to_launch(1)) == [1, 2]
    pipeline.add(1, "one")
    with pytest.raises(RuntimeError, match="launched in step order"):
        pipeline.add(3, "three")
    pipeline.add(2, "two")
    assert pipeline.take(1) == "one" and pipeline.in_flight == 1
    with pytest.raises(RuntimeError, match="taken in step order"):
        pipeline.take(3)


def test_a_resumed_pipeline_launches_from_the_step_after_the_checkpoint():
    pipeline = RolloutPipeline(2, last_step=10)
    pipeline.next_to_launch = 5   # resumed after step 4
    assert list(pipeline.to_launch(5)) == [5, 6, 7]
    assert list(RolloutPipeline(2, last_step=6).to_launch(5)) == [1, 2, 3, 4, 5, 6]   # never past the last step


def test_negative_staleness_is_refused():
    with pytest.raises(ValueError, match="max_staleness"):
        RolloutPipeline(-1, last_step=2)


def test_a_rollout_in_flight_is_kept_in_a_checkpoint_exactly(tmp_path):
    # An async checkpoint keeps the rollouts launched ahead of its step: small fields as JSON, per-token
    # ids and float32 log-probs as flat safetensors arrays. Restored, every value is what was sampled.
    import json

    import numpy as np
    from safetensors.numpy import load_file, save_file

    from rl_service.driver.rollout_client import rollout_from_state, rollout_state
    from rl_service.rollout import Rollout

    rng = np.random.default_rng(0)
    lengths = [3, 0, 5]   # a completion of no tokens too
    shard = Rollout(request_index=[0, 0, 1], prompt_token_ids=[[1, 2], [1, 2], [7]],
                    completion_token_ids=[rng.integers(0, 50_000, n).tolist() for n in lengths],
                    behaviour_logprobs=[(-rng.random(n) * 10).astype(np.float32) for n in lengths],
                    completion_texts=["abc", "", "\u00e9\u4e2d"], finished=[True, False, True], weight_versions=[4, 4, 4])
    arrays: dict = {}
    states = [rollout_state(shard, "step_3.0", arrays), rollout_state(Rollout(), "step_3.1", arrays)]
    save_file(arrays, str(tmp_path / "in_flight.safetensors"))
    (tmp_path / "in_flight.json").write_text(json.dumps(states))
    loaded = load_file(str(tmp_path / "in_flight.safetensors"))
    kept, empty = (rollout_from_state(state, f"step_3.{index}", loaded)
                   for index, state in enumerate(json.loads((tmp_path / "in_flight.json").read_text())))
    assert len(empty) == 0 and empty.behaviour_logprobs == []
    for name in ("request_index", "prompt_token_ids", "completion_token_ids", "completion_texts", "finished",
                 "weight_versions"):
        assert getattr(kept, name) == getattr(shard, name), name
    assert all(got.dtype == np.float32 and got.tobytes() == want.tobytes()
               for got, want in zip(kept.behaviour_logprobs, shard.behaviour_logprobs, strict=True))
