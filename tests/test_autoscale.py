"""The generator-pool autoscaler: its rule as a plain function, its config checks, and a real run in
which slow generation (the HF engine) grows the pool to its maximum."""
from __future__ import annotations

import pytest

from conftest import REPO, read_metrics, run_short_job
from rl_service.config import load_config
from rl_service.driver.elastic import autoscale_target
from rl_service.errors import ConfigError


@pytest.mark.parametrize("engines, generate, train, expected", [
    (1, 3.0, 1.0, 2),     # the learner waits on generation: grow
    (4, 3.0, 1.0, 4),     # ... but never past the maximum
    (3, 0.4, 1.0, 2),     # engines idle most of the step: shrink
    (1, 0.1, 1.0, 1),     # ... but never under the minimum
    (2, 0.8, 1.0, 2),     # balanced enough: stay
])
def test_autoscale_target(engines, generate, train, expected):
    assert autoscale_target(engines, generate, train, minimum=1, maximum=4) == expected


def test_autoscale_config_is_checked_by_field():
    with pytest.raises(ConfigError, match=r"generator.autoscale.min \(3\) must be <= generator.autoscale.max \(2\)"):
        load_config(None, ["generator.autoscale={min: 3, max: 2}"])
    with pytest.raises(ConfigError, match=r"generator.num_engines \(5\) must lie within generator.autoscale \[1, 4\]"):
        load_config(None, ["generator.num_engines=5", "generator.autoscale={min: 1, max: 4}"])
    with pytest.raises(ConfigError, match="generator.autoscale needs weight_sync.transport"):
        load_config(None, ["generator.autoscale={min: 1, max: 2}", "weight_sync.transport=collective"])
    assert load_config(REPO / "configs" / "quickstart.yaml", ["generator.autoscale={min: 1, max: 2}"]).generator.autoscale.max == 2


def test_slow_generation_grows_the_pool_during_a_run(tmp_path):
    summary = run_short_job(tmp_path, ["generator.backend=hf", "generator.autoscale={min: 1, max: 2, every: 1}",
                                       "eval_every=0", "checkpoint.every=0"], steps=4)
    assert summary["stopped_reason"] == "completed"
    engines = [row["generator_engines"] for row in read_metrics(tmp_path) if "generator_engines" in row]
    assert engines[0] == 1.0 and engines[-1] == 2.0
