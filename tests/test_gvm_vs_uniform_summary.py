"""Hand cases for the summary of benchmarks/gvm_vs_uniform.py: curve interpolation, samples to target,
the pairing against dynamic sampling, and merged run files that must agree; every arm's settings load."""
import argparse
import json

import pytest

from benchmarks.gvm_vs_uniform import ARMS, DYNAMIC_COMBINED, PRIORITY, REPO, run_overrides
from benchmarks.gvm_vs_uniform_summary import first_crossing, interpolate, load_runs, mean_ci, versus_dynamic
from rl_service.config import load_config


def run(arm: str, seed: int, points: list[tuple[int, float, int]]) -> dict:
    return {"algorithm": "grpo", "arm": arm, "seed": seed, "steps": points[-1][0], "wall_s": 1.0,
            "zero_advantage_fraction": None,
            "curve": [{"step": s, "accuracy": a, "generated": g, "trained": g} for s, a, g in points]}


def test_interpolation_and_first_crossing_by_hand():
    xs, ys = [0, 100, 300], [0.30, 0.34, 0.30]
    assert interpolate(xs, ys, 50) == pytest.approx(0.32)
    assert interpolate(xs, ys, 200) == pytest.approx(0.32)
    assert interpolate(xs, ys, 900) == 0.30                      # past the end: the last value
    assert first_crossing(xs, ys, 0.33) == pytest.approx(75)    # 0.30 → 0.34 over 100 samples
    assert first_crossing(xs, ys, 0.35) is None
    assert first_crossing(xs, ys, 0.30) == 0
    entry = mean_ci([1.0, 3.0])                                  # t(1) = 12.706, sd √2, n 2 → 12.706
    assert entry["mean"] == 2.0 and entry["ci95"] == pytest.approx(12.706)


def test_gvm_with_dynamic_sampling_is_paired_with_dynamic_sampling_by_seed():
    runs = [run("dynamic", 0, [(0, 0.30, 0), (10, 0.36, 1000)]), run("dynamic", 1, [(0, 0.30, 0), (10, 0.40, 2000)]),
            run("gvm_dynamic_samples", 0, [(0, 0.30, 0), (10, 0.38, 800)]),
            run("gvm_dynamic_samples", 1, [(0, 0.30, 0), (10, 0.40, 1000)]),
            run("gvm_dynamic_samples", 2, [(0, 0.30, 0), (10, 0.50, 10)])]   # no dynamic twin: left out
    versus = versus_dynamic(runs, DYNAMIC_COMBINED)["gvm_dynamic_samples_vs_dynamic"]
    assert versus["seeds"] == 2
    assert versus["generated_ratio"]["mean"] == pytest.approx((0.8 + 0.5) / 2)
    assert versus["final_minus_dynamic"]["mean"] == pytest.approx((0.02 + 0.0) / 2)
    # at dynamic's sample count a shorter curve keeps its final accuracy
    assert versus["at_dynamic_samples_minus_dynamic"]["mean"] == pytest.approx(0.01)
    assert "gvm_dynamic_vs_dynamic" not in versus_dynamic(runs, DYNAMIC_COMBINED)


def test_merged_run_files_must_agree_run_for_run(tmp_path, capsys):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    same = run("uniform", 0, [(0, 0.3, 0), (10, 0.35, 1280)])
    first.write_text(json.dumps(same) + "\n")
    second.write_text(json.dumps(same) + "\n" + json.dumps(run("uniform", 1, [(0, 0.3, 0)])) + "\n")
    assert len(load_runs([first, second])) == 2
    assert "reproduced to the digit: ('grpo', 'uniform', 0)" in capsys.readouterr().out
    second.write_text(json.dumps(run("uniform", 0, [(0, 0.3, 0), (10, 0.36, 1280)])) + "\n")
    with pytest.raises(SystemExit, match=r"b.jsonl:1: \('grpo', 'uniform', 0\) differs"):
        load_runs([first, second])


@pytest.mark.parametrize("num_train", [96, 2048])
def test_every_arm_the_benchmark_runs_is_a_config_the_service_accepts(num_train):
    """An arm whose settings the config check refuses would only fail after the arms before it ran."""
    args = argparse.Namespace(steps=30, eval_every=5, prompts=16, samples=8, num_train=num_train, lr=5e-5,
                              eval_prompts=1024, overrides=[], data_source="arithmetic")
    assert set(arm for _, arm in PRIORITY) == set(ARMS)
    for algorithm, arm in PRIORITY:
        config = load_config(REPO / "configs" / "quickstart.yaml", run_overrides(algorithm, arm, 0, args))
        assert config.data.arithmetic.num_train == num_train
        assert (config.statistics.allocation == "gvm") == arm.startswith("gvm"), (algorithm, arm)
        assert getattr(config.algorithm, "dynamic_sampling", False) == ("dynamic" in arm), (algorithm, arm)


def test_a_users_dataset_is_its_own_pool_and_its_eval_split_is_capped():
    """`--config` on a user's data: the arithmetic pool settings stay away, the eval split is capped."""
    args = argparse.Namespace(steps=4, eval_every=2, prompts=4, samples=4, num_train=96, lr=1e-4, eval_prompts=512,
                              overrides=[], data_source="hf")
    overrides = run_overrides("grpo", "gvm_online", 0, args)
    assert not any(o.startswith("data.arithmetic") for o in overrides)
    config = load_config(REPO / "configs" / "hf_dataset.yaml", overrides)
    assert config.data.source == "hf" and config.data.eval_limit == 512
    assert config.statistics.allocation == "gvm" and config.learner.lr == 1e-4


def test_variance_ratios_report_each_keys_worst_snapshot(tmp_path, monkeypatch):
    """A saved gvm_variance.py run with two snapshots: each JSON key is the larger of the two ratios."""
    from benchmarks.gvm_variance import REAL_ARMS
    from benchmarks.gvm_vs_uniform_summary import variance_ratios

    def snapshot(scale: float) -> dict:
        real = {}
        for alg in ("grpo", "raft", "raft_expected_pilot", "raft_expected_online"):
            for k, arm in enumerate(REAL_ARMS):
                real[f"{arm}/{alg}"] = {"ratio_vs_uniform": 1.0 if arm == "uniform" else scale * (k + 1) / 4,
                                        "zero_advantage_fraction": 0.5, "mean_shift_vs_uniform": 0.0}
        return {"real": real, "pool": {"arms": {}}}

    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({"settings": {"draws": 4}, "wall_s": 1.0,
                                 "results": {"builtin": snapshot(1.0), "trained": snapshot(1.2)}}))
    ratios = variance_ratios((str(saved),))
    assert ratios["gvm_grad_variance_ratio_grpo"] == pytest.approx(1.2 * 2 / 4)          # gvm_pilot, trained
    assert ratios["gvm_grad_variance_ratio_raft_online"] == pytest.approx(1.2 * 3 / 4)   # gvm_online
    assert ratios["gvm_grad_variance_ratio_raft_expected"] == pytest.approx(1.2 * 2 / 4)
    assert ratios["gvm_grad_variance_ratio_grpo_group"] == pytest.approx(1.2 * 4 / 4)
    by = ratios["gvm_grad_variance_by_snapshot"]["gvm_grad_variance_ratio_grpo"]
    assert sorted(by.values()) == pytest.approx([0.5, 0.6])
    from benchmarks import gvm_vs_uniform_summary
    monkeypatch.setattr(gvm_vs_uniform_summary, "PILOT32_RUN", str(saved))
    assert gvm_vs_uniform_summary.pilot32_ratios() == pytest.approx(
        {"gvm_grad_variance_ratio_grpo_pilot32": 0.6, "gvm_grad_variance_ratio_raft_pilot32": 0.6,
         "gvm_grad_variance_ratio_raft_expected_pilot32": 0.6})      # the pilot arms only
