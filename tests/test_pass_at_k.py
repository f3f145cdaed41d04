"""pass@k / mean@k: the estimator against the closed form 1 − C(n−c,k)/C(n,k) in exact rationals, a
hand-computed two-prompt case, the config rules, and a real run that logs and plots them."""
from __future__ import annotations

from fractions import Fraction
from math import comb

import pytest

from rl_service.pass_at_k import pass_at_k, sampled_eval_metrics


def _closed_form(n: int, c: int, k: int) -> Fraction:
    """Chen et al. 2021 eq. 1 in exact arithmetic (independent of the product form under test)."""
    return 1 - Fraction(comb(n - c, k), comb(n, k))


def test_pass_at_k_hand_case():
    # n=5 samples, c=2 correct, k=2: C(3,2)/C(5,2) = 3/10 of the pairs hold no correct sample.
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-15)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0   # 2 wrong samples cannot fill 3 draws
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25, abs=1e-15)      # pass@1 = c/n


def test_pass_at_k_matches_the_closed_form_everywhere():
    for n in range(1, 21):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(_closed_form(n, c, k)), abs=1e-12), (n, c, k)
    # Large n: the binomials overflow a float, the product form does not.
    assert pass_at_k(400, 3, 100) == pytest.approx(float(_closed_form(400, 3, 100)), abs=1e-12)


def test_pass_at_k_refuses_impossible_counts():
    for n, c, k in ((3, 4, 1), (3, 1, 0), (3, 1, 4), (3, -1, 1)):
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_sampled_eval_metrics_hand_case():
    # Prompt 0: 1 of 3 correct (pass@1 1/3, pass@2 1 − C(2,2)/C(3,2) = 2/3, pass@3 1); prompt 1: none.
    # Samples arrive interleaved: the request index, not the order, says whose they are.
    rewards = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    index = [0, 1, 0, 1, 1, 0]
    metrics = sampled_eval_metrics(rewards, index, num_prompts=2, samples=3)
    assert metrics == pytest.approx({"eval_pass_at_1": 1 / 6, "eval_pass_at_2": 1 / 3, "eval_pass_at_3": 1 / 2,
                                     "eval_mean_at_3": 1 / 6}, abs=1e-15)
    assert set(sampled_eval_metrics([1.0, 0.0], [0, 0], 1, 2, prefix="eval_think")) == {
        "eval_think_pass_at_1", "eval_think_pass_at_2", "eval_think_mean_at_2"}


def test_sampled_eval_metrics_refuses_uneven_counts():
    with pytest.raises(ValueError, match="every prompt needs 2 samples"):
        sampled_eval_metrics([1.0, 0.0, 1.0], [0, 0, 1], num_prompts=2, samples=2)


def test_eval_config_rules():
    from rl_service.config import load_config
    from rl_service.errors import UserError

    config = load_config("configs/pass_at_k.yaml")
    assert config.eval.samples == 8 and config.eval.temperature == 1.0
    assert load_config("configs/quickstart.yaml").eval.samples is None   # greedy only unless asked
    for bad, message in ((["eval.samples=0"], "eval.samples"), (["eval.temperature=0"], "eval.temperature")):
        with pytest.raises(UserError, match=message):
            load_config("configs/quickstart.yaml", bad)
    with pytest.raises(UserError, match="eval.samples applies to grpo and raft"):
        load_config("configs/bvpo.yaml", ["eval.samples=4"])


def test_in_process_eval_reports_pass_at_k():
    from rl_service.config import load_config
    from rl_service.driver.evaluation import evaluate_model_dir

    config = load_config("configs/quickstart.yaml", ["data.arithmetic.num_eval=4", "generator.max_new_tokens=24",
                                                     "eval.samples=3"])
    metrics = evaluate_model_dir(config)
    assert [key for key in metrics if "_at_" in key] == ["eval_pass_at_1", "eval_pass_at_2", "eval_pass_at_3",
                                                         "eval_mean_at_3"]
    # pass@1 is the mean accuracy of the samples; pass@k grows with k.
    assert metrics["eval_pass_at_1"] == pytest.approx(metrics["eval_mean_at_3"], abs=1e-12)
    assert metrics["eval_pass_at_1"] <= metrics["eval_pass_at_2"] <= metrics["eval_pass_at_3"] <= 1.0


def test_run_logs_and_plots_pass_at_k(tmp_path):
    from conftest import read_metrics, run_short_job
    from rl_service.report import write_report

    run_short_job(tmp_path, ["eval.samples=2", "data.arithmetic.num_eval=8"], steps=1)
    evals = [row for row in read_metrics(tmp_path) if "eval_accuracy" in row]
    assert [row["step"] for row in evals] == [0, 1]
    for row in evals:
        assert 0.0 <= row["eval_pass_at_1"] <= row["eval_pass_at_2"] <= 1.0
        assert row["eval_pass_at_1"] == pytest.approx(row["eval_mean_at_2"], abs=1e-12)
    result = write_report(tmp_path)
    assert tmp_path / "report" / "pass_at_k.png" in result.written
