"""What a run tells its user while it trains and where it puts its results (issue #18, findings 1, 2
and 5): the absolute run directory first, a log line per step and per evaluation wherever stdout is
not a terminal (a Ray job's log), a bar that ends on the final evaluation, checkpoints by default on
a cluster, and `submit` refusing paths that are not there before anything reaches a cluster.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rl_service.config import load_config
from rl_service.config.sections import CLUSTER_CHECKPOINT_EVERY
from rl_service.progress import format_eval_line, format_step_line
from rl_service.driver.step_loop import checkpoint_every

REPO = Path(__file__).resolve().parents[1]
RUN = ["steps=3", "eval_every=2", "data.prompts_per_step=4", "generator.samples_per_prompt=4",
       "data.arithmetic.num_train=64", "data.arithmetic.num_eval=16", "generator.max_new_tokens=32",
       "schedule.mode=sync", "guard.max_eval_drop=null", "logging.tensorboard=false"]


def test_a_step_line_holds_what_verl_and_openrlhf_print():
    metrics = {"reward_mean": 0.375, "accepted_fraction": 0.25, "loss": -0.0123, "kl_k3_mean": 0.0004,
               "grad_norm": 0.5125, "completions_per_s": 210.54, "step_seconds": 2.0, "time_generate_s": 1.2,
               "time_reward_s": 0.1, "time_train_s": 0.6, "time_publish_s": 0.08, "time_driver_s": 0.02,
               "tokens_per_s": 3000.0}
    assert format_step_line(12, 50, metrics) == (
        "step 12/50 | reward 0.3750 | accepted 0.250 | loss -0.0123 | kl 0.0004 | grad_norm 0.5125 | compl/s 210.5 "
        "| time 2.00s: generate 60% reward 5% train 30% publish 4% driver 1%")
    # A preference step has no accepted fraction and no KL: left out, not printed as 0.
    assert format_step_line(1, 2, {"reward_mean": float("nan"), "loss": 0.69}) == "step 1/2 | reward nan | loss 0.69"


def test_an_eval_line_names_its_step():
    assert format_eval_line(30, {"eval_accuracy": 0.516, "eval_seconds": 4.0, "eval_accuracy_level_1": 0.9}) == (
        "eval step 30 | accuracy 0.5160 | accuracy_level_1 0.9000")
    assert format_eval_line(0, {}) == "eval step 0 | no eval split"


def test_a_run_on_a_cluster_checkpoints_by_default_and_a_local_one_at_the_end(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    quickstart = REPO / "configs" / "quickstart.yaml"
    assert checkpoint_every(load_config(quickstart, ["checkpoint.every=null"])) == 0
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")   # what Ray sets for a job's entrypoint
    assert checkpoint_every(load_config(quickstart, ["checkpoint.every=null"])) == CLUSTER_CHECKPOINT_EVERY
    assert checkpoint_every(load_config(quickstart, ["checkpoint.every=0"])) == 0   # said explicitly: obeyed
    monkeypatch.delenv("RAY_ADDRESS")
    assert checkpoint_every(load_config(quickstart, ["checkpoint.every=null", "cluster.address=10.0.0.1:6379"])) == 10
    assert load_config(quickstart).checkpoint.every is None   # the default is the automatic choice
    # deploy/README.md has users export the job server's URL for the job commands: no cluster to join.
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    config = load_config(quickstart, ["checkpoint.every=null"])
    assert config.cluster.address_to_join() is None and checkpoint_every(config) == 0
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert config.cluster.address_to_join() == "127.0.0.1:6379"


def _cli(args: list[str], env_extra: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items()
           if name not in ("RAY_ADDRESS", "TTY_COMPATIBLE", "FORCE_COLOR", "RL_SERVICE_SUBMISSION_ID")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "rl_service.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _sets(overrides: list[str]) -> list[str]:
    return [item for override in overrides for item in ("--set", override)]


@pytest.mark.slow
def test_a_piped_run_prints_its_run_directory_first_then_a_line_per_step_and_evaluation(tmp_path):
    # The bar is on (the default), but stdout is a pipe, as in a Ray job: lines, every 2nd step.
    result = _cli(["run", "configs/quickstart.yaml", *_sets(RUN + [f"logging.output_dir={tmp_path}",
                                                                   "logging.log_every=2"])])
    assert result.returncode == 0, result.stderr[-3000:]
    first = result.stdout.splitlines()[0]
    assert first.startswith("run directory: /"), result.stdout[:500]
    run_dir = Path(first.removeprefix("run directory: "))
    assert run_dir.parent == tmp_path and run_dir.name.startswith("quickstart-")   # <output_dir>/<run id>
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = result.stderr.splitlines()
    steps = [re.search(r"step (\d+)/3 \| reward [0-9.]+ \| accepted [0-9.]+ \| loss \S+ \| grad_norm \S+ \| "
                       r"compl/s [0-9.]+ \| time [0-9.]+s: generate \d+%", line) for line in lines]
    assert [int(match[1]) for match in steps if match] == [2, 3]     # every 2nd step, and the last
    evals = [re.search(r"eval step (\d+) \| accuracy ([0-9.]+)", line) for line in lines]
    evals = [(int(match[1]), float(match[2])) for match in evals if match]
    assert [step for step, _ in evals] == [0, 2, 3]                  # before, every eval_every, after
    assert evals[-1][1] == pytest.approx(summary["final_eval_accuracy"], abs=5e-5)
    assert evals[0][1] == pytest.approx(summary["initial_eval_accuracy"], abs=5e-5)


@pytest.mark.slow
def test_the_bar_ends_on_the_final_evaluation(tmp_path):
    # TTY_COMPATIBLE=1: rich treats the pipe as a terminal, so the bar is drawn and no step lines are.
    result = _cli(["run", "configs/quickstart.yaml", "--run-dir", str(tmp_path / "run"), *_sets(RUN)],
                  {"TTY_COMPATIBLE": "1", "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    shown = re.findall(r"eval ([0-9.]+) \(step (\d+)\)", result.stdout)
    assert shown, result.stdout[-2000:]
    assert shown[-1] == (f"{summary['final_eval_accuracy']:.4f}", "3")
    assert "step 1/3 |" not in result.stderr and "eval step 3 |" in result.stderr


def test_submit_refuses_a_path_missing_here_in_one_line_unless_told_it_is_on_the_cluster():
    nowhere = "http://127.0.0.1:9"   # nothing listens: reaching it would be a different error
    refused = _cli(["submit", "configs/quickstart.yaml", "--set", "model.path=/nonexistent/model", "--address", nowhere])
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "rl-service: error: model.path /nonexistent/model: no such file or directory on this machine (pass "
        "--no-local-check if it exists only on the cluster's nodes)"]
    custom = _cli(["submit", "configs/quickstart.yaml", "--set", "reward.custom=rewards/none.py:fn", "--address", nowhere])
    assert custom.returncode == 2 and "reward.custom rewards/none.py: no such file" in custom.stderr
    # Skipped check: the command goes on to the cluster, which is not there.
    unchecked = _cli(["submit", "configs/quickstart.yaml", "--set", "model.path=/nonexistent/model", "--no-local-check",
                      "--address", nowhere])
    assert unchecked.returncode == 2 and "cannot reach" in unchecked.stderr and "model.path" not in unchecked.stderr



def test_submit_runs_validates_checks_before_anything_is_submitted(tmp_path):
    """A malformed dataset row or a reward file outside the working directory was accepted by submit
    and failed only on the cluster, after the job had started."""
    nowhere = "http://127.0.0.1:9"
    bad = REPO / "configs" / "data" / f"bad-{tmp_path.name}.jsonl"   # inside the working directory, as a job's data is
    bad.write_text('{"prompt": "1+1", "answer": "2"}\nnot json\n')
    try:
        refused = _cli(["submit", "configs/jsonl_example.yaml", "--set", f"data.train_path={bad.relative_to(REPO)}",
                        "--address", nowhere])
    finally:
        bad.unlink()
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [f"rl-service: error: {bad.relative_to(REPO)}:2: not valid JSON (Expecting value)"]
    leaving = _cli(["submit", "configs/custom_reward_example.yaml", "--set",
                    "reward.custom=../elsewhere/reward.py:reward", "--no-local-check", "--address", nowhere])
    assert leaving.returncode == 2 and leaving.stderr.startswith(
        f"rl-service: error: reward.custom ../elsewhere/reward.py: outside the working directory ({REPO}), which is all a "
        "submitted job receives"), leaving.stderr


def test_status_blames_the_venv_only_when_rl_service_or_its_dependencies_are_missing():
    from rl_service.driver.jobs import rl_service_import_failed

    assert rl_service_import_failed("ModuleNotFoundError: No module named 'rl_service'")
    assert rl_service_import_failed("ModuleNotFoundError: No module named 'torch.distributed'")
    # A custom reward's neighbour module: the user's file, not the node's python.
    assert not rl_service_import_failed("importing the module raised ModuleNotFoundError: No module named 'helper_mod'")


def _summary_of(trainer_class, config_name: str, step_metrics: list[dict], checkpoint: Path | None) -> dict:
    """`trainer_class.summary` on a bare trainer (no Ray): TrainerBase's own state, what the trainer's
    steps add to it (totals, `add_phase_times`), and a loop result."""
    from collections import defaultdict

    from rl_service.driver.step_loop import LoopResult
    from rl_service.driver.training_run import PreparedJob, TrainerBase

    trainer = object.__new__(trainer_class)
    TrainerBase.__init__(trainer, PreparedJob(load_config(REPO / "configs" / config_name), None, None), None, None)
    if config_name.startswith("bvpo"):   # what PreferenceTrainer.__init__ adds that its summary reads
        trainer.totals, trainer.last_learner_metrics, trainer.dataset = defaultdict(float), {}, None
    for metrics in step_metrics:
        trainer.totals["completions"] += int(metrics["completions"])
        trainer.totals["completion_tokens"] += int(metrics["completion_tokens"])
        trainer.add_phase_times(metrics)
    trainer.eval_history = [(0, 0.25), (2, 0.5)]
    result = LoopResult(steps=2, train_wall_s=4.0, initial={"eval_accuracy": 0.25}, final={"eval_accuracy": 0.5},
                        stopped_reason="completed", checkpoint_path=checkpoint)
    return trainer.summary(result, lost_s=0.0)


def test_both_job_kinds_summaries_carry_the_documented_keys(tmp_path, monkeypatch):
    """summary.json of an RL job and of a DPO/BVPO job hold the same run-level keys (README's run-directory
    table, throughput and time shares per phase); a preference summary once lacked tokens_per_s,
    train_wall_s_this_attempt and the time shares. And `final_checkpoint` is absolute even when the run
    directory was given relative (`--run-dir runs/s1`)."""
    from rl_service.driver.preference_loop import PreferenceTrainer
    from rl_service.driver.step_metrics import PHASES
    from rl_service.driver.trainer import Trainer

    monkeypatch.chdir(tmp_path)
    relative = Path("runs/s1/checkpoints/step_2")
    rl_step = {"completions": 16.0, "completion_tokens": 320.0, "time_generate_s": 1.0, "time_reward_s": 0.25,
               "time_statistics_s": 0.25, "time_train_s": 0.5, "time_publish_s": 0.0, "time_driver_s": 0.0}
    # A preference step times no statistics phase.
    preference_step = {"completions": 32.0, "completion_tokens": 640.0, "time_generate_s": 1.0,
                       "time_reward_s": 0.5, "time_train_s": 0.5, "time_publish_s": 0.0, "time_driver_s": 0.0}
    rl = _summary_of(Trainer, "quickstart.yaml", [rl_step, rl_step], relative)
    preference = _summary_of(PreferenceTrainer, "bvpo.yaml", [preference_step] * 2, relative)

    table_row = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `summary.json`"))
    documented = set(re.findall(r"`([a-z_]+)`", table_row.split("|")[2]))
    assert {"train_wall_s_this_attempt", "completions_per_s", "final_eval_accuracy"} <= documented
    shared = documented | {"tokens_per_s", "best_eval_accuracy", "weight_version", "stopped_reason",
                           "final_checkpoint"} | {f"time_share_{name}" for name in PHASES}
    for summary in (rl, preference):
        assert shared <= set(summary), shared - set(summary)
        assert sum(summary[f"time_share_{name}"] for name in PHASES) == pytest.approx(1.0)
        assert summary["train_wall_s"] == summary["train_wall_s_this_attempt"] == 4.0
        assert summary["final_checkpoint"] == str(tmp_path / relative)
    assert set(rl) <= set(preference)   # a preference summary adds its pairs and per-mode accuracies
    assert rl["tokens_per_s"] == 640 / 4.0 and preference["tokens_per_s"] == 1280 / 4.0
    assert preference["time_share_statistics"] == 0.0 and preference["time_share_generate"] == pytest.approx(0.5)
    assert preference["algorithm"] == "bvpo" and preference["pairs_trained"] == 0


def test_the_summary_is_a_line_per_figure_where_stdout_is_not_a_terminal(capsys, monkeypatch):
    # In a job's log rich wrapped the table to 80 columns: the run directory and the stop reason broke across lines.
    from rl_service.progress import SUMMARY_KEYS, print_summary

    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    reason = "reward.custom failed on every completion of step 1 (16 errors, 0 timeouts; " + "x" * 120 + ")"
    run_dir = "/a/long/" + "run-directory-" * 8
    print_summary({"steps": 1, "final_eval_accuracy": 0.5625, "stopped_reason": reason}, run_dir)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"rl_service run: {run_dir}" and len(lines) == 1 + len(SUMMARY_KEYS)
    assert f"  stopped_reason: {reason}" in lines and "  final_eval_accuracy: 0.5625" in lines and "  steps: 1" in lines
