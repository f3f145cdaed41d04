"""The guards that stop a run early (rl_service/driver/step_loop.py `guard_stop_reason`): non-finite
updates, an eval collapse, and a custom reward that fails on every completion of a step. A stopped
run keeps the checkpoint from before the stop, not the weights it stopped on, and exits non-zero."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, short_run_overrides
from rl_service.config import load_config
from rl_service.driver.step_loop import guard_stop_reason


def _config(*overrides: str):
    return load_config(REPO / "configs" / "quickstart.yaml", list(overrides))


def test_a_reward_that_fails_on_every_completion_stops_the_run():
    config = _config()
    every = {"completions": 64.0, "pilot_completions": 0.0, "custom_reward_errors": 60.0, "custom_reward_timeouts": 4.0}
    reason = guard_stop_reason(config, 3, every, 0, False)
    assert reason.startswith("reward.custom failed on every completion of step 3 (60 errors, 4 timeouts")
    # One completion scored: a reward that fails on some inputs is counted, not stopped.
    assert guard_stop_reason(config, 3, {**every, "custom_reward_errors": 59.0}, 0, False) is None
    # Pilot samples are generated but not in the step's scored batch: 32 + 32 pilots, all 32 failed.
    assert guard_stop_reason(config, 3, {"completions": 64.0, "pilot_completions": 32.0,
                                         "custom_reward_errors": 32.0}, 0, False) is not None
    # A step that scored nothing (a preference step logs no completions) is not a failure.
    assert guard_stop_reason(config, 3, {}, 0, False) is None


def test_non_finite_and_collapse_guards():
    config = _config("guard.max_nonfinite_steps=3", "guard.max_eval_drop=0.2")
    assert guard_stop_reason(config, 5, {}, 2, False) is None
    assert guard_stop_reason(config, 5, {}, 3, False).startswith("3 steps in a row with a non-finite loss")
    assert guard_stop_reason(config, 5, {}, 0, True).startswith("eval accuracy collapsed at step 5 (guard.max_eval_drop=0.2)")


@pytest.mark.slow
def test_a_custom_reward_failing_on_a_whole_step_stops_the_run_and_exits_non_zero(tmp_path):
    """A reward that raised on every call ran to "completed", exit 0, on rewards of 0. This one works for
    its first 8 calls in each reward actor (step 1 holds 16 completions), then fails on every call: the
    run stops after step 2, whose weights are not checkpointed; step 1's checkpoint stays the newest."""
    reward = tmp_path / "flaky_judge.py"
    reward.write_text("calls = 0\n\ndef reward(completion, answer):\n    global calls\n    calls += 1\n"
                      "    if calls > 8:\n        raise RuntimeError('the judge is down')\n"
                      "    return 1.0 if completion.strip().endswith(answer) else 0.0\n")
    run_dir = tmp_path / "run"
    overrides = [*short_run_overrides(3), "checkpoint.every=1", f"reward.custom={reward}:reward",
                 "reward.custom_sandbox=off", "logging.tensorboard=false"]
    done = subprocess.run([sys.executable, "-m", "rl_service.cli", "run", str(REPO / "configs" / "quickstart.yaml"),
                           "--run-dir", str(run_dir), *[arg for item in overrides for arg in ("--set", item)]],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 3, done.stderr[-3000:]
    assert "RuntimeError" in done.stderr and "the judge is down" in done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["stopped_reason"].startswith(
        "reward.custom failed on every completion of step 2 (16 errors, 0 timeouts")
    assert summary["final_checkpoint"].endswith("step_1") and not (run_dir / "checkpoints" / "step_2").exists()
    # The driver's own lines are kept beside the metrics, the stop reason among them.
    log = (run_dir / "driver.log").read_text()
    assert "eval step 0 | accuracy" in log and "ERROR rl_service: reward.custom failed on every completion" in log
    assert "run ended after step 2: reward.custom failed on every completion of step 2" in log
