"""BVPO end to end on real Ray + DeepSpeed + the shipped tiny model (ALGORITHMS.md §BVPO): an online run
that improves its reward, online α̂ through the actors, and a short offline run from JSONL."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from conftest import REPO, read_metrics

pytestmark = pytest.mark.slow

QUIET = ["logging.progress_bar=false", "logging.tensorboard=false"]


def _run(config_name: str, run_dir, overrides: list[str]) -> dict:
    from rl_service.config import load_config
    from rl_service.driver import prepare_job, run_training

    config = load_config(REPO / "configs" / config_name, QUIET + overrides)
    return run_training(prepare_job(config), run_dir)


def test_online_bvpo_improves_its_reward(tmp_path):
    # 16 fixed easy-to-medium prompts, seen every step: the reward on them must climb within 8 steps.
    steps = 8
    summary = _run("bvpo.yaml", tmp_path, [
        f"steps={steps}", "eval_every=0", "data.arithmetic.levels=[1,2,3]", "data.arithmetic.num_train=16",
        "data.arithmetic.num_eval=16", "data.prompts_per_step=16", "generator.samples_per_prompt=8",
        "generator.max_new_tokens=48", "learner.lr=1e-4"])
    rows = read_metrics(tmp_path)
    train = [row for row in rows if "reward_mean" in row]
    assert [row["step"] for row in train] == list(range(1, steps + 1))
    for row in train:
        assert row["completions"] == 16 * 8 + 16 * 16                # both modes, 16 reasoning-off samples
        assert 0 <= row["pairs"] <= 16 and row["pairs"] + row["prompts_without_pair"] == 16
        # The mean over all samples: 8 with reasoning on and 16 with it off per prompt.
        assert row["reward_mean"] == pytest.approx((8 * row["reward_mean_reasoning_on"] + 16 * row["reward_mean_reasoning_off"]) / 24)
        # Reasoning off answers at once; reasoning on writes a trace first.
        assert row["completion_length_mean_reasoning_off"] < row["completion_length_mean_reasoning_on"]
        if row["pairs"]:
            assert row["alpha"] == 0.5 and math.isfinite(row["loss"]) and row["grad_norm"] > 0
            # per_term (the default): each term trains on its own pairs, a prompt may have one mode only.
            assert max(row["trace_pairs"], row["empty_pairs"]) <= row["pairs"] <= row["trace_pairs"] + row["empty_pairs"]
            assert row["trace_pairs"] == 16 * row["trace_pair_yield"] and row["empty_pairs"] == 16 * row["empty_pair_yield"]
            for mode in ("trace", "empty"):
                assert ({f"{mode}_loss", f"{mode}_rewards_margin"} <= set(row)) == (row[f"{mode}_pairs"] > 0)
    assert sum(row["pairs"] for row in train) == summary["pairs_trained"] > 0
    early = np.mean([row["reward_mean"] for row in train[:3]])
    late = np.mean([row["reward_mean"] for row in train[-3:]])
    print(f"reward (both modes) steps 1-3: {early:.3f}, steps {steps - 2}-{steps}: {late:.3f}")
    assert late > early + 0.05, (early, late)
    assert summary["nan_skipped_steps"] == 0 and summary["weight_version"] == summary["steps"] == steps
    for mode in ("reasoning_on", "reasoning_off"):
        assert 0.0 <= summary[f"final_eval_accuracy_{mode}"] <= 1.0
    assert (tmp_path / "checkpoints" / f"step_{steps}" / "model" / "model.safetensors").is_file()
    # `rl-service eval` of the final weights with the job's config is the run's own measure: both
    # reasoning modes, and their mean as eval_accuracy (it reported reasoning on alone).
    from rl_service.config import load_config
    from rl_service.driver.evaluation import evaluate_model_dir

    config = load_config(tmp_path / "config.yaml", [f"model.path={tmp_path / 'checkpoints' / f'step_{steps}' / 'model'}"])
    evaluated = evaluate_model_dir(config)
    for key in ("eval_accuracy", "eval_accuracy_reasoning_on", "eval_accuracy_reasoning_off"):
        assert evaluated[key] == pytest.approx(summary[key.replace("eval_", "final_eval_", 1)]), key


def test_online_alpha_hat_runs_through_the_actors(tmp_path):
    summary = _run("bvpo.yaml", tmp_path, [
        "steps=2", "eval_every=0", "data.arithmetic.levels=[1,2]", "data.arithmetic.num_train=8",
        "data.arithmetic.num_eval=8", "data.prompts_per_step=8", "generator.samples_per_prompt=6",
        "generator.max_new_tokens=40", "preference.alpha_mode=online", "preference.alpha_resamples=3",
        "preference.off_samples_per_prompt=4"])
    rows = read_metrics(tmp_path)
    assert all(row["completions"] == 8 * 6 + 8 * 4 for row in rows if "reward_mean" in row)   # the budget split
    train = [row for row in rows if "reward_mean" in row and row["pairs"] > 0]
    assert train, "no step had a pair in both modes"
    for row in train:
        assert 0.0 <= row["bvpo_alpha"] <= 1.0 and row["alpha"] == row["bvpo_alpha"]
        assert row["bvpo_trace_variance"] >= 0 and row["bvpo_bias_sq"] >= 0
    state = json.loads((tmp_path / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert state["alpha_estimator"]["num_updates"] == sum("alpha_update_skipped" not in row for row in train)
    assert summary["steps"] == 2


def test_offline_bvpo_trains_from_jsonl_and_skips_bad_rows(tmp_path):
    data = tmp_path / "prefs.jsonl"
    shutil.copy(REPO / "configs" / "data" / "bvpo_offline.jsonl", data)
    with open(data, "ab") as handle:
        handle.write(b'{"prompt": "What is 1 + 1?", "trace_chosen": "x", "trace_rejected": "x", '
                     b'"empty_chosen": "2", "empty_rejected": "3"}\n')
    summary = _run("bvpo_offline.yaml", tmp_path / "run", [
        "steps=3", "eval_every=0", "data.arithmetic.num_eval=16", "data.prompts_per_step=16",
        f"preference.dataset_path={data}"])
    rows = read_metrics(tmp_path / "run")
    assert rows[0] == {"step": 0, "dataset_rows": 256.0, "bad_rows_skipped": 1.0}
    train = [row for row in rows if "loss" in row]
    assert [row["pairs"] for row in train] == [16.0, 16.0, 16.0]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)       # π_θ = π_ref at the start
    assert train[-1]["reference_pairs_computed"] == 48.0                  # once per pair, 48 distinct rows
    assert summary["completions"] == 0 and summary["bad_rows_skipped"] == 1 and summary["pairs_trained"] == 48
    assert summary["weight_version"] == 3                                 # published for the final eval
    eval_rows = [row for row in rows if "eval_accuracy" in row]
    assert [row["step"] for row in eval_rows] == [0, 3]
    assert {"eval_accuracy_reasoning_on", "eval_accuracy_reasoning_off"} <= set(eval_rows[-1])
