"""Resume after a real SIGKILL (real Ray, DeepSpeed, vLLM): the continued run ends with the weights and
metrics of an uninterrupted one; a kill during a checkpoint write leaves the previous one loadable."""
from __future__ import annotations

import json
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from safetensors.numpy import load_file

from conftest import EMPTY_SAFETENSORS, REPO, comparable_metrics, read_metrics, run_short_job, short_run_overrides

STEPS = 5
EXTRA = ["checkpoint.every=2", "checkpoint.keep_last=2"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rl_service.cli", *args]


def _kill_after_checkpoint(run_dir, step: int, timeout_s: float = 240, config_name: str = "quickstart.yaml",
                           overrides: list[str] | None = None) -> None:
    """Start a job (the short quickstart by default) as `rl-service run` and SIGKILL its whole
    process group (driver and the local Ray it started) as soon as checkpoint `step` is complete.
    If this process was descheduled past it, the newer checkpoints are deleted (a user rolling a
    step back does the same): the resume starts from `step` whatever the timing."""
    overrides = short_run_overrides(STEPS) + EXTRA if overrides is None else overrides
    process = subprocess.Popen(_cli("run", str(REPO / "configs" / config_name), "--run-dir", str(run_dir),
                                    *[f"--set={item}" for item in overrides]), cwd=REPO, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + timeout_s
    try:
        while not (latest.is_file() and int(latest.read_text().removeprefix("step_") or 0) >= step):
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    for newer in (run_dir / "checkpoints").glob("step_*"):
        if int(newer.name.removeprefix("step_")) > step:
            shutil.rmtree(newer)
    assert (run_dir / "checkpoints" / f"step_{step}" / "trainer_state.json").is_file()


# Each case's overrides on top of the short quickstart (sync mode unless the case says otherwise).
RESUME_CASES = {
    "full_weights": [],
    # LoRA: the checkpoint holds the adapter (adapter/) and the optimizer state of the adapters only.
    "lora": ["learner.lora.rank=4", "learner.lr=1e-3"],
    # GVM with group statistics: steps 3-5 allocate new prompts from the groups' averages in the checkpoint.
    "gvm_groups": ["statistics.allocation=gvm", "statistics.unseen_prompts=group", "statistics.n_pilot=2"],
    # Async: step k+1's rollout was launched before step k trained, with the weights of step k-1.
    "async_staleness_1": ["schedule.mode=async", "schedule.max_staleness=1"],
    "async_staleness_2": ["schedule.mode=async", "schedule.max_staleness=2"],
    # DAPO dynamic sampling: extra rounds draw more prompts from the sampler within a step.
    "dynamic_sampling": ["algorithm.dynamic_sampling=true"],
    "dynamic_sampling_samples_gvm": ["algorithm.dynamic_sampling=true", "algorithm.dynamic_sampling_target=samples",
                                     "statistics.allocation=gvm", "statistics.n_pilot=2"],
    # Offline pilot, chunks of 3 steps: the checkpoint of step 2 (or 4) falls inside a chunk.
    "gvm_offline_pilot_mid_chunk": ["statistics.allocation=gvm", "statistics.mode=offline_pilot",
                                    "statistics.chunk_steps=3", "statistics.n_pilot=2"],
    # Both at once: a chunk's batches are either in flight or still queued at the checkpoint.
    "async_gvm_offline_pilot": ["schedule.mode=async", "schedule.max_staleness=1", "statistics.allocation=gvm",
                                "statistics.mode=offline_pilot", "statistics.chunk_steps=3", "statistics.n_pilot=2"],
    "gvm_step_pilot": ["statistics.allocation=gvm", "statistics.mode=step_pilot", "statistics.n_pilot=2"],
    # pass@k eval: 4 sampled completions per eval prompt beside the greedy ones.
    "pass_at_k_eval": ["eval.samples=4"],
}


def _ledger(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, case):
    from rl_service.cli import main

    lora = case == "lora"
    extra = EXTRA + RESUME_CASES[case]
    uninterrupted = tmp_path / "uninterrupted"
    run_short_job(uninterrupted, extra, steps=STEPS)

    killed = tmp_path / "killed"
    _kill_after_checkpoint(killed, step=2, overrides=short_run_overrides(STEPS) + extra)
    assert not (killed / "summary.json").exists()
    staleness = next((int(item.split("=")[1]) for item in extra if item.startswith("schedule.max_staleness=")), 0)
    held = json.loads((killed / "checkpoints" / "step_2" / "trainer_state.json").read_text()).get("in_flight_steps", [])
    assert held == list(range(3, 3 + staleness))   # async: the rollouts launched ahead of step 2, kept
    assert main(["resume", str(killed)]) == 0

    assert comparable_metrics(read_metrics(killed)) == comparable_metrics(read_metrics(uninterrupted))
    final = f"checkpoints/step_{STEPS}/" + ("adapter/adapter_model.safetensors" if lora else "model/model.safetensors")
    got, want = load_file(str(killed / final)), load_file(str(uninterrupted / final))
    assert got.keys() == want.keys() and all((got[name] == want[name]).all() for name in want)
    assert _ledger(killed) == _ledger(uninterrupted)
    summary = json.loads((killed / "summary.json").read_text())
    want_summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["completions"] == want_summary["completions"]
    # Pilots and dynamic sampling's extra rounds generate more than the trained budget.
    extra_rounds = case.startswith("dynamic_sampling") or "offline_pilot" in case
    assert summary["completions"] >= STEPS * 4 * 4 if extra_rounds else summary["completions"] == STEPS * 4 * 4
    # keep_last=2: only the two newest checkpoints remain.
    assert sorted(path.name for path in (killed / "checkpoints").glob("step_*")) == ["step_4", f"step_{STEPS}"]


def test_resume_without_a_checkpoint_is_a_one_line_error(tmp_path, capsys):
    from rl_service.cli import main

    assert main(["resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("job_name: x\n")
    assert main(["resume", str(tmp_path)]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
    """A resume replays the steps after its checkpoint: the events logged after it are purged, as the
    metrics rows are (TensorBoard's loader, purge_orphaned_data on by default, drops them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rl_service.config import load_config
    from rl_service.driver.run_dir import RunDirectory

    def shown() -> list[tuple[int, float]]:
        events = EventAccumulator(str(tmp_path / "tb"))
        events.Reload()
        return [(event.step, event.value) for event in events.Scalars("loss")]

    def attempt(resume_step: int | None, steps: range, offset: float) -> None:
        run_dir = RunDirectory(tmp_path, load_config(None, ["logging.tensorboard=true"]), resume_step=resume_step)
        for step in steps:
            run_dir.log(step, {"loss": offset + step})
        run_dir.close()

    attempt(None, range(1, 6), 0.0)
    attempt(3, range(4, 7), 10.0)    # killed at step 5, resumed from the checkpoint of step 3
    assert shown() == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0)]
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    attempt(-1, range(1, 3), 20.0)   # a restart before any checkpoint starts over
    assert shown() == [(1, 21.0), (2, 22.0)]


def _save_complete(directory: str) -> None:
    """A learner's part of a checkpoint as `write_checkpoint` expects it: weights (a model/ with its
    config and safetensors, as a complete checkpoint needs) and learner state."""
    os.makedirs(os.path.join(directory, "model"))
    for name in ("model/config.json", "model/model.safetensors", "learner_state.json", "learner_state.safetensors"):
        Path(directory, name).write_bytes(EMPTY_SAFETENSORS if name.endswith(".safetensors") else b"")


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    """A real process writes checkpoint 1, then is killed inside checkpoint 2's model write."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from rl_service.config import load_config
        from rl_service.driver.run_dir import RunDirectory

        def save(directory, stall):   # what a learner writes: its weights and its state
            model = Path(directory) / "model"
            model.mkdir()
            whole = {EMPTY_SAFETENSORS!r}   # a complete (empty) safetensors file; the torn one is cut short
            (model / "model.safetensors").write_bytes(whole[:5] if stall else whole)
            (model / "config.json").write_text("{{}}")
            (Path(directory) / "learner_state.json").write_bytes(b"")
            (Path(directory) / "learner_state.safetensors").write_bytes(whole)
            if stall:
                print("writing", flush=True)
                time.sleep(60)

        run_dir = RunDirectory({str(tmp_path)!r}, load_config(None, ["logging.tensorboard=false"]))
        state = {{"step": 1}}
        run_dir.write_checkpoint(1, lambda d: save(d, False), {{}}, state)
        run_dir.write_checkpoint(2, lambda d: save(d, True), {{}}, {{"step": 2}})
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    process.send_signal(signal.SIGKILL)
    process.wait()

    from rl_service.config import load_config
    from rl_service.driver.run_dir import RunDirectory, latest_checkpoint

    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint == tmp_path / "checkpoints" / "step_1"
    assert json.loads((checkpoint / "trainer_state.json").read_text()) == {"step": 1}
    assert (tmp_path / "checkpoints" / ".tmp_step_2").is_dir()          # the torn write, never named
    # Writing step 2 again (the resumed run) replaces the torn staging directory.
    run_dir = RunDirectory(tmp_path, load_config(None, ["logging.tensorboard=false"]), resume_step=1)
    run_dir.write_checkpoint(2, lambda d: _save_complete(d), {}, {"step": 2})
    run_dir.close()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_2"
    assert not (tmp_path / "checkpoints" / ".tmp_step_2").exists()


@pytest.mark.slow
def test_three_non_finite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    """A reward whose group variance overflows float64 makes every update non-finite: each is skipped and counted, the
    third in a row stops the run, and no checkpoint is written after the last good one. A group whose
    samples all share one length parity has no reward spread and so no update at all; 8 prompts × 8
    samples make every step hold groups with a spread (4 × 4 left a step without one, by chance)."""
    (tmp_path / "huge.py").write_text("def reward(completion, answer):\n    return 1e300 if len(completion) % 2 else 0.0\n")
    # reward.clip (default ±1e6) would tame 1e300: widen it to let the overflow through to the learner
    # (the sandbox is not what this test is about, and is off so it needs no bubblewrap).
    summary = run_short_job(tmp_path / "run", ["checkpoint.every=2", f"reward.custom={tmp_path / 'huge.py'}:reward",
                                               "reward.clip=[-1e300,1e300]", "reward.custom_sandbox=off",
                                               "data.prompts_per_step=8", "generator.samples_per_prompt=8"],
                            steps=6)
    assert summary["steps"] == 3 and "non-finite" in summary["stopped_reason"]
    assert summary["final_checkpoint"].endswith("step_2")
    rows = [row for row in read_metrics(tmp_path / "run") if "loss" in row]
    assert [row["nonfinite_update_fraction"] for row in rows] == [1.0, 1.0, 1.0]
    assert not (tmp_path / "run" / "checkpoints" / "step_3").exists()
    initial = load_file(str(REPO / "rl_service" / "models" / "builtin" / "model.safetensors"))
    kept = load_file(str(tmp_path / "run" / "checkpoints" / "step_2" / "model" / "model.safetensors"))
    assert all((kept[name] == initial[name]).all() for name in initial)      # no bad update reached the weights


# -- preference jobs (DPO / BVPO, issue 17) ---------------------------------------------------------

PREFERENCE_STEPS = 4
PREFERENCE_RUN = [f"steps={PREFERENCE_STEPS}", "eval_every=2", "checkpoint.every=2", "data.arithmetic.levels=[1,2]",
                  "data.arithmetic.num_train=32", "data.arithmetic.num_eval=8", "data.prompts_per_step=4",
                  "generator.samples_per_prompt=4", "generator.max_new_tokens=40", "logging.progress_bar=false",
                  "logging.tensorboard=false", "guard.max_eval_drop=null", "generator.backend=torch", "cluster.torch_threads=1"]


def _preference_case(case: str, tmp_path) -> tuple[str, list[str]]:
    if case == "bvpo_online_alpha_hat":   # α̂'s moving averages and the online pair ids must carry over
        return "bvpo.yaml", PREFERENCE_RUN + ["preference.alpha_mode=online", "preference.alpha_resamples=3"]
    # Offline, 6 rows and 4 a step: rows come back after the checkpoint, from the restored reference cache.
    rows = (REPO / "configs" / "data" / "bvpo_offline.jsonl").read_text().splitlines()[:6]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(rows) + "\n")
    return "bvpo_offline.yaml", PREFERENCE_RUN + [f"preference.dataset_path={data}"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["bvpo_online_alpha_hat", "bvpo_offline"])
def test_a_killed_preference_run_resumes_to_the_uninterrupted_result(tmp_path, case):
    from rl_service.cli import main
    from rl_service.config import load_config
    from rl_service.driver import prepare_job, run_training

    config_name, overrides = _preference_case(case, tmp_path)
    uninterrupted = tmp_path / "uninterrupted"
    run_training(prepare_job(load_config(REPO / "configs" / config_name, overrides)), uninterrupted)

    killed = tmp_path / "killed"
    _kill_after_checkpoint(killed, 2, 300, config_name, overrides)
    assert not (killed / "summary.json").exists()
    assert main(["resume", str(killed)]) == 0

    got, want = comparable_metrics(read_metrics(killed)), comparable_metrics(read_metrics(uninterrupted))
    assert got == want and [row["step"] for row in got if "loss" in row] == list(range(1, PREFERENCE_STEPS + 1))
    final = f"checkpoints/step_{PREFERENCE_STEPS}/model/model.safetensors"
    got_weights, want_weights = load_file(str(killed / final)), load_file(str(uninterrupted / final))
    assert got_weights.keys() == want_weights.keys()
    assert all((got_weights[name] == want_weights[name]).all() for name in want_weights)
    state = json.loads((killed / "checkpoints" / f"step_{PREFERENCE_STEPS}" / "trainer_state.json").read_text())
    want_state = json.loads((uninterrupted / "checkpoints" / f"step_{PREFERENCE_STEPS}" / "trainer_state.json").read_text())
    # The run's training time so far (both attempts' for the killed run) is the one field that differs.
    assert state["totals"].pop("train_wall_s") > 0 and want_state["totals"].pop("train_wall_s") > 0
    assert state == want_state
    if case == "bvpo_online_alpha_hat":
        assert state["alpha_estimator"]["num_updates"] > 0
    else:   # the restored cache served the rows seen before the kill: each of the 6 computed once
        assert [row for row in got if "loss" in row][-1]["reference_pairs_computed"] == 6.0
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["steps"] == PREFERENCE_STEPS and summary["stopped_reason"] == "completed"
    want_summary = json.loads((uninterrupted / "summary.json").read_text())
    for key in ("initial_eval_accuracy", "initial_eval_accuracy_reasoning_on", "initial_eval_accuracy_reasoning_off",
                "final_eval_accuracy_reasoning_on", "final_eval_accuracy_reasoning_off"):
        assert summary[key] is not None and summary[key] == want_summary[key], key   # the step-0 eval, from the run dir
