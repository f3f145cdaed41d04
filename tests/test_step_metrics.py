"""An RL step's logged row (rl_service/driver/step_metrics.py) on a hand case: no Ray."""
from __future__ import annotations

import math

import numpy as np
import pytest

from rl_service.rewards.verifiers import SCORE_COUNTER_KEYS
from rl_service.driver.rollout_client import PhaseTimer
from rl_service.driver.step_metrics import step_metrics


def _scored() -> dict:
    return {"rewards": [1.0, 0.0, 0.5, 1.0], "completion_lengths": [10, 20, 30, 40],
            "finished": [True, True, False, True], "request_index": [0, 0, 1, 1], "weight_versions": [3, 3, 2, 3],
            **dict.fromkeys(SCORE_COUNTER_KEYS, 0)}


def test_a_step_row_counts_pilots_in_the_cost_and_the_driver_is_the_rest_of_the_wall_time():
    timer = PhaseTimer()
    timer.seconds.update(generate=0.5, train=0.25)
    metrics = step_metrics(_scored(), np.array([1.0, 0.0, 0.0, 1.0]), np.array([0, 0, 1, 0]), timer, 2.0,
                           pilot_completions=2, weight_version=4, in_flight=1, engines=2)
    assert metrics["reward_mean"] == pytest.approx(2.5 / 4) and metrics["accepted_fraction"] == 0.5
    assert metrics["completion_length_mean"] == 25.0 and metrics["truncated_fraction"] == 0.25
    assert metrics["completions"] == 6.0 and metrics["pilot_completions"] == 2.0        # 4 trained + 2 pilot
    assert metrics["completion_tokens"] == 100.0 and metrics["tokens_per_s"] == 50.0
    assert metrics["completions_per_s"] == 3.0 and metrics["sample_staleness_mean"] == 0.25
    assert metrics["time_generate_s"] == 0.5 and metrics["time_driver_s"] == pytest.approx(1.25)
    assert metrics["driver_overhead_fraction"] == pytest.approx(1.25 / 2.0)
    assert (metrics["weight_version"], metrics["rollouts_in_flight"], metrics["generator_engines"]) == (4.0, 1.0, 2.0)


def test_role_metrics_come_last_in_order_and_an_empty_step_is_nan_not_an_error():
    timer = PhaseTimer()
    empty = {"rewards": [], "completion_lengths": [], "finished": [], **dict.fromkeys(SCORE_COUNTER_KEYS, 0)}
    metrics = step_metrics(empty, np.array([]), np.array([]), timer, 1.0, 0, 0, 0, 1,
                           {"loss": 1.0, "p": 0.1}, {"loss": 2.0})
    assert metrics["loss"] == 2.0 and metrics["p"] == 0.1          # the learner's row wins over an earlier one
    assert math.isnan(metrics["reward_mean"]) and metrics["completions"] == 0.0
