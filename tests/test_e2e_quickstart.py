"""End to end on real Ray + DeepSpeed + the shipped tiny model: the loop, its outputs, determinism."""
from __future__ import annotations

import json
import math

import pytest
from safetensors.numpy import load_file

from conftest import comparable_metrics, read_metrics, run_short_job


def test_short_run_trains_logs_and_checkpoints(short_run):
    run_dir, summary = short_run
    for key in ("steps", "completions", "completion_tokens", "train_wall_s", "completions_per_s",
                "initial_eval_accuracy", "final_eval_accuracy"):
        assert key in summary, key
    assert summary["steps"] == 3
    assert summary["completions"] == 3 * 4 * 4
    assert summary["completion_tokens"] > summary["completions"]
    assert 0.0 <= summary["initial_eval_accuracy"] <= 1.0 and 0.0 <= summary["final_eval_accuracy"] <= 1.0
    assert summary["weight_version"] == 3
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3

    rows = read_metrics(run_dir)
    train_rows = [row for row in rows if "loss" in row]
    assert [row["step"] for row in train_rows] == [1, 2, 3]
    for row in train_rows:
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
        assert row["weight_version"] == row["step"]           # generators serve the newest weights
        assert row["optimizer_steps"] == 1
        # The generator's log-probs are the learner's on the same weights (fp32, same model).
        assert row["behaviour_logprob_abs_diff"] < 1e-3
        for phase in ("generate", "reward", "statistics", "train", "publish"):
            assert row[f"time_{phase}_s"] > 0
    eval_steps = [row["step"] for row in rows if "eval_accuracy" in row]
    assert eval_steps == [0, 2, 3]
    assert any(row["grad_norm"] > 0 for row in train_rows)    # some group had a reward spread

    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_3"
    final = checkpoints / "step_3"
    assert (final / "model" / "model.safetensors").is_file() and (final / "model" / "tokenizer.json").is_file()
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["weight_version"] == 3 and state["sampler"]["position"] == 12
    statistics = load_file(str(final / "statistics.safetensors"))
    assert int(statistics["visit_count"].sum()) == 12
    assert (checkpoints / "step_2" / "model" / "model.safetensors").is_file()
    assert not list(checkpoints.glob(".tmp_*"))
    assert list((run_dir / "tb").iterdir())
    assert "job_name: quickstart" in (run_dir / "config.yaml").read_text()


def test_checkpoint_loads_as_a_model_and_evaluates(short_run):
    from rl_service.config import load_config
    from rl_service.driver.evaluation import evaluate_model_dir

    run_dir, summary = short_run
    config = load_config(None, [f"model.path={run_dir / 'checkpoints' / 'step_3' / 'model'}",
                                "data.arithmetic.num_train=64", "data.arithmetic.num_eval=16", "generator.max_new_tokens=48"])
    metrics = evaluate_model_dir(config)
    # In-process greedy eval of the saved weights reproduces the run's final eval exactly.
    assert metrics["eval_accuracy"] == pytest.approx(summary["final_eval_accuracy"])


def test_same_seed_gives_same_metrics(short_run, tmp_path):
    run_dir, _ = short_run
    run_short_job(tmp_path / "again")
    assert comparable_metrics(read_metrics(tmp_path / "again")) == comparable_metrics(read_metrics(run_dir))
