"""Chaos: kill one role's process (a real SIGKILL) in a real run; the run recovers from its newest
checkpoint and ends as if nothing had happened: the ledger holds every step's prompts exactly once,
and metrics and final weights equal an uninterrupted run's (sync mode replays exactly)."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil
import pytest
from safetensors.numpy import load_file

from conftest import FRACTIONS, comparable_metrics, read_metrics, run_short_job

pytestmark = [pytest.mark.slow, pytest.mark.chaos]
STEPS = 4
EXTRA = ["checkpoint.every=2"]


def _ledger(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]


class Killer(threading.Thread):
    """SIGKILLs this run's processes titled `ray::<role>…` once the run has logged `after_step`."""

    def __init__(self, run_dir, role: str, after_step: int):
        super().__init__(daemon=True)
        self.run_dir, self.title, self.after_step = run_dir, f"ray::{role}", after_step
        self.killed: list[int] = []
        self.run_had_finished = None

    def _reached(self) -> bool:
        metrics = self.run_dir / "metrics.jsonl"
        return metrics.is_file() and any(f'"step": {self.after_step},' in line and '"loss"' in line
                                         for line in metrics.read_text().splitlines())

    def run(self) -> None:
        deadline = time.monotonic() + 300
        while not self._reached() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.run_had_finished = (self.run_dir / "summary.json").exists()
        # Only this test's own run: the local Ray the driver (this process) started, and its actors.
        for process in psutil.Process(os.getpid()).children(recursive=True):
            try:
                cmdline = process.cmdline()
            except psutil.Error:
                continue
            if cmdline and cmdline[0].startswith(self.title):
                os.kill(process.pid, signal.SIGKILL)
                self.killed.append(process.pid)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_short_job(run_dir, EXTRA, steps=STEPS)
    return run_dir


@pytest.mark.parametrize("role", ["GeneratorActor", "RewardActor", "StatisticsActor", "LearnerActor"])
def test_a_killed_role_is_recovered_and_every_prompt_is_trained_once(reference, tmp_path, role):
    run_dir = tmp_path / "run"
    killer = Killer(run_dir, role, after_step=3)     # kills during step 4: recovery from checkpoint step_2
    killer.start()
    summary = run_short_job(run_dir, EXTRA, steps=STEPS)
    killer.join(timeout=5)
    assert killer.killed and killer.run_had_finished is False, "the kill must land inside the run"

    ledger = _ledger(run_dir)
    assert [row["step"] for row in ledger] == list(range(1, STEPS + 1))       # every step once, none twice
    assert ledger == _ledger(reference)                                       # the same prompts and counts
    compared = comparable_metrics(read_metrics(run_dir))
    assert compared == comparable_metrics(read_metrics(reference))
    assert FRACTIONS <= set().union(*compared), FRACTIONS - set().union(*compared)
    final = f"checkpoints/step_{STEPS}/model/model.safetensors"
    got, want = load_file(str(run_dir / final)), load_file(str(reference / final))
    assert all((got[name] == want[name]).all() for name in want)
    assert summary["steps"] == STEPS and summary["stopped_reason"] == "completed"
    # A reward actor is stateless: Ray restarts it and retries the call; the other roles hold state,
    # so the driver restarts every role from the newest checkpoint.
    assert summary["role_failures_recovered"] == (0 if role == "RewardActor" else 1)


def test_a_killed_preference_learner_is_recovered(tmp_path):
    """BVPO online with α̂ (issue 17): the learner (weights, Adam moments, α̂'s moving averages) dies
    during step 4; every role restarts from checkpoint step_2 and the run ends as if it had not."""
    from conftest import REPO
    from rl_service.config import load_config
    from rl_service.driver import prepare_job, run_training

    overrides = [f"steps={STEPS}", "eval_every=2", "checkpoint.every=2", "data.arithmetic.levels=[1,2]",
                 "data.arithmetic.num_train=32", "data.arithmetic.num_eval=8", "data.prompts_per_step=4",
                 "generator.samples_per_prompt=4", "generator.max_new_tokens=40", "logging.progress_bar=false",
                 "logging.tensorboard=false", "guard.max_eval_drop=null", "preference.alpha_mode=online",
                 "preference.alpha_resamples=3", "generator.backend=torch", "cluster.torch_threads=1"]

    def run(run_dir):
        return run_training(prepare_job(load_config(REPO / "configs" / "bvpo.yaml", overrides)), run_dir)

    reference = tmp_path / "uninterrupted"
    run(reference)
    run_dir = tmp_path / "run"
    killer = Killer(run_dir, "LearnerActor", after_step=3)
    killer.start()
    summary = run(run_dir)
    killer.join(timeout=5)
    assert killer.killed and killer.run_had_finished is False, "the kill must land inside the run"

    compared = comparable_metrics(read_metrics(run_dir))
    assert compared == comparable_metrics(read_metrics(reference))
    assert [row["step"] for row in compared if "loss" in row] == list(range(1, STEPS + 1))
    assert any("bvpo_alpha" in row for row in compared)
    final = f"checkpoints/step_{STEPS}/model/model.safetensors"
    got, want = load_file(str(run_dir / final)), load_file(str(reference / final))
    assert all((got[name] == want[name]).all() for name in want)
    assert summary["steps"] == STEPS and summary["stopped_reason"] == "completed"
    assert summary["role_failures_recovered"] == 1
