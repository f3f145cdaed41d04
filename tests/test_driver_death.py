"""A SIGKILLed driver leaves nothing behind (issue #19, finding 6): the learner's /dev/shm weight
mailbox is removed once its creator is gone, and the local Ray the driver started (GCS, raylet,
dashboard, its agents, workers) is gone within seconds, not minutes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, SHORT_JOB


def test_a_killed_creator_s_mailbox_is_removed(tmp_path):
    # The creator is a real process holding a real mailbox; SIGKILL runs none of its cleanup.
    creator = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from rl_service.weights.shared_memory import MailboxLayout, WeightMailbox
        mailbox = WeightMailbox.create(MailboxLayout.of([("w", (4,), "float32")]), "death", Path({str(tmp_path)!r}))
        print(mailbox.path, flush=True)
        time.sleep(600)
    """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        path = Path(creator.stdout.readline().strip())
        assert path.is_file()
        time.sleep(1.5)
        assert path.is_file()                       # kept while its creator lives
    finally:
        creator.send_signal(signal.SIGKILL)
        creator.wait()
    deadline = time.monotonic() + 5
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not path.exists()


def test_the_mailbox_cleanup_outlives_a_creator_that_kills_its_children_on_exit(tmp_path):
    # A Ray worker that exits kills its direct children (RAY_kill_child_processes_on_worker_exit):
    # when the driver was SIGKILLed, the learner saw its raylet go, exited, and took the cleanup
    # loop with it, leaving the mailbox behind (CI, 2026-12-06). The creator here does the same.
    creator = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, psutil
        from pathlib import Path
        from rl_service.weights.shared_memory import MailboxLayout, WeightMailbox
        mailbox = WeightMailbox.create(MailboxLayout.of([("w", (4,), "float32")]), "exit", Path({str(tmp_path)!r}))
        print(mailbox.path, flush=True)
        for child in psutil.Process().children():
            child.kill()
        os._exit(0)
    """)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert creator.returncode == 0, creator.stderr
    path = Path(creator.stdout.strip())
    deadline = time.monotonic() + 10
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not path.exists()


@pytest.mark.slow
def test_a_sigkilled_driver_leaves_no_ray_process_and_no_mailbox(tmp_path):
    job = f"driverdeath{os.getpid()}"
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    driver = subprocess.Popen(
        [sys.executable, "-m", "rl_service.cli", "run", "configs/quickstart.yaml", "--run-dir", str(tmp_path / "run"),
         *SHORT_JOB, "--set", "steps=1000", "--set", f"job_name={job}", "--set", "weight_sync.transport=shared_memory",
         "--set", "cluster.include_dashboard=true"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mailboxes: list[Path] = []
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "run" / "metrics.jsonl").is_file() or not mailboxes:   # training, mailbox up
            assert driver.poll() is None and time.monotonic() < deadline, "the run never started training"
            mailboxes = list(Path("/dev/shm").glob(f"rl_service-weights-{job}*"))
            time.sleep(0.5)
        ray_processes = psutil.Process(driver.pid).children(recursive=True)
        assert len(ray_processes) >= 4                   # GCS, raylet, dashboard, agents, workers
    finally:
        driver.send_signal(signal.SIGKILL)              # the driver alone, as `kill -9 PID` does
        driver.wait()
    deadline = time.monotonic() + 30
    alive = ray_processes
    while time.monotonic() < deadline:
        alive = [process for process in ray_processes if process.is_running()
                 and process.status() != psutil.STATUS_ZOMBIE]
        if not alive and not any(path.exists() for path in mailboxes):
            break
        time.sleep(0.5)
    names = [process.name() for process in alive if process.is_running()]
    for process in alive:   # never leave them to the next test
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    assert names == [], names
    assert not any(path.exists() for path in mailboxes)


def _stop_after_the_first_checkpoint(run, stop) -> tuple[str, int]:
    """Run the quickstart into `run`, call `stop(driver)` once it has written checkpoint 2; (stderr, exit code)."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "rl_service.cli", "run", "configs/quickstart.yaml", "--run-dir", str(run),
         *SHORT_JOB, "--set", "steps=1000", "--set", "checkpoint.every=2"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "step_2").is_dir():
            assert driver.poll() is None and time.monotonic() < deadline, "the run never wrote a checkpoint"
            time.sleep(0.5)
        stop(driver)
        return driver.communicate(timeout=120)[1], driver.returncode
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()


def _stop_twice_as_ray_does(driver) -> None:
    driver.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    if driver.poll() is None:   # stop pressed twice: the second must not cut the shutdown short
        driver.send_signal(signal.SIGTERM)
    try:   # as Ray's job stop does: SIGKILL if the driver is still there 3 s later
        driver.wait(timeout=3)
    except subprocess.TimeoutExpired:
        driver.kill()


def test_sigterm_stops_a_run_with_one_line_naming_the_checkpoint_to_resume(tmp_path):
    # Ray's job stop sends SIGTERM, then SIGKILL 3 s later. The driver died in Ray's C++ failure
    # handler ("*** SIGTERM received at time=..." and a stack dump) with nothing of ours in the log.
    run = tmp_path / "run"
    stderr, returncode = _stop_after_the_first_checkpoint(run, _stop_twice_as_ray_does)
    assert "*** SIGTERM received" not in stderr and "Traceback" not in stderr, stderr[-2000:]
    said = [line for line in stderr.splitlines() if line.startswith("rl-service: stopped by SIGTERM")]
    assert len(said) == 1, stderr[-2000:]
    assert said[0].startswith(f"rl-service: stopped by SIGTERM; {run}: newest checkpoint step_"), said[0]
    assert f"continue with `rl-service resume {run}`" in said[0]
    assert returncode in (128 + signal.SIGTERM, -signal.SIGKILL)
    # The run directory's own log says why the run stopped (it ended at the last step line).
    assert said[0].removeprefix("rl-service: ") in (run / "driver.log").read_text()


def test_a_sigterm_after_ray_has_shut_down_does_not_kill_a_stopped_run(tmp_path):
    # Ray's shutdown puts SIGTERM back to its default action; a second `stop` that arrived while the
    # stopped driver was exiting killed it by signal (exit -15 in CI, not 143).
    stopped = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal, sys, time
        from rl_service.config import load_config
        from rl_service.driver.roles import ray_session
        from rl_service.driver.stop_signal import StopRequested

        config = load_config("configs/quickstart.yaml", ["cluster.num_cpus=1"])

        def placing_the_roles(config, verifier):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)   # the handler raises here

        try:
            with ray_session(config, placing_the_roles, "arithmetic", run_dir={str(tmp_path)!r}):
                pass
        except StopRequested:
            os.kill(os.getpid(), signal.SIGTERM)   # the second stop, Ray already down
            time.sleep(1)
            sys.exit(7)
    """)], cwd=REPO, env={**os.environ, "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=180)
    assert stopped.returncode == 7, (stopped.returncode, stopped.stderr[-2000:])
    assert "rl-service: stopped by SIGTERM" in stopped.stderr


def test_a_stop_belongs_to_the_session_it_stopped(tmp_path, monkeypatch):
    # One process may run several sessions (a benchmark's runs, tests): an earlier session's stop made
    # every later one take its errors for a stop and ignore SIGTERM after its Ray shut down.
    from rl_service.driver import stop_signal

    monkeypatch.setattr(stop_signal, "_REQUESTED", [])
    original = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(stop_signal.StopRequested):
            with stop_signal.stop_on_sigterm(tmp_path):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)   # the handler raises here
        assert stop_signal.stop_requested() is not None
        with stop_signal.stop_on_sigterm(tmp_path):
            assert stop_signal.stop_requested() is None
    finally:
        signal.signal(signal.SIGTERM, original)


def test_ctrl_c_names_the_checkpoint_to_resume_as_sigterm_does(tmp_path):
    run = tmp_path / "run"
    stderr, returncode = _stop_after_the_first_checkpoint(run, lambda driver: driver.send_signal(signal.SIGINT))
    said = [line for line in stderr.splitlines() if line.startswith("rl-service: interrupted")]
    assert len(said) == 1 and said[0].startswith(f"rl-service: interrupted; {run}: newest checkpoint step_"), stderr[-2000:]
    assert f"continue with `rl-service resume {run}`" in said[0]
    assert returncode == 130


def test_a_stop_that_comes_out_of_ray_as_another_error_still_ends_as_a_stop(tmp_path, monkeypatch, capsys):
    # Raised by the handler inside Ray's C++ code (a ray.get while the roles start), StopRequested came
    # out as "SystemError: ... returned a result with an exception set", and the run ended in its traceback.
    from rl_service import cli
    from rl_service.driver import stop_signal

    monkeypatch.setattr(stop_signal, "_REQUESTED", [])

    def placing_the_roles(_args):
        with stop_signal.stop_on_sigterm(tmp_path):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)   # the handler raises here, between two bytecodes
            except stop_signal.StopRequested:
                raise SystemError("<built-in method __new__> returned a result with an exception set") from None
        return 0

    monkeypatch.setattr(cli, "_command_validate", placing_the_roles)
    original = signal.getsignal(signal.SIGTERM)
    try:
        assert cli.main(["validate", "unused.yaml"]) == 128 + signal.SIGTERM
        assert capsys.readouterr().err.strip() == f"rl-service: stopped by SIGTERM; {tmp_path}: no checkpoint yet"
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN   # stopping: a second SIGTERM waits for the end
    finally:
        signal.signal(signal.SIGTERM, original)


def _a_role_actor_runs(pid: int) -> bool:
    for child in psutil.Process(pid).children(recursive=True):
        try:
            name = child.name()
        except psutil.Error:   # a short-lived process, gone already
            continue
        if name.startswith("ray::") and name.endswith(("Actor", "Pool")):
            return True
    return False


def test_sigterm_while_the_roles_start_is_one_line_too(tmp_path):
    # From ray.init to the first step (placing the roles; minutes with vLLM) a stop ended in Ray's
    # C++ stack dump: the handler was installed only once every role was up.
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    run = tmp_path / "run"
    driver = subprocess.Popen(
        [sys.executable, "-m", "rl_service.cli", "run", "configs/quickstart.yaml", "--run-dir", str(run),
         *SHORT_JOB, "--set", "steps=1000"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        # A role's actor process (ray::GeneratorActor, ...): ray.init has returned, the roles are being placed.
        while not _a_role_actor_runs(driver.pid):
            assert driver.poll() is None and time.monotonic() < deadline, "Ray never started"
            time.sleep(0.1)
        driver.send_signal(signal.SIGTERM)
        stderr = driver.communicate(timeout=120)[1]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert not (run / "metrics.jsonl").is_file() or not any("loss" in line for line in (run / "metrics.jsonl").open())
    assert "*** SIGTERM received" not in stderr and "Traceback" not in stderr, stderr[-2000:]
    said = [line for line in stderr.splitlines() if line.startswith("rl-service: stopped by SIGTERM")]
    assert said == [f"rl-service: stopped by SIGTERM; {run}: no checkpoint yet"], stderr[-2000:]
    assert driver.returncode == 128 + signal.SIGTERM


@pytest.mark.slow
def test_summary_throughput_covers_the_whole_run_after_a_resume(short_run, tmp_path):
    """Issue #19 finding 7: after a resume, completions/s divided every completion of the run by the
    time since the resume (352/s reported for ~40/s). Now the training wall time before the
    checkpoint (kept in it) is added to this attempt's."""
    import json
    import shutil

    from conftest import short_run_overrides
    from rl_service.config import load_config
    from rl_service.driver import prepare_job, run_training

    source, _ = short_run
    run_dir = tmp_path / "resumed"
    shutil.copytree(source, run_dir)
    checkpoint = run_dir / "checkpoints" / "step_2"
    before = json.loads((checkpoint / "trainer_state.json").read_text())["totals"]["train_wall_s"]
    assert before > 0
    config = load_config(REPO / "configs" / "quickstart.yaml", short_run_overrides(3))
    summary = run_training(prepare_job(config), run_dir, resume_from=checkpoint)
    assert summary["completions"] == 3 * 4 * 4                    # all three steps' completions ...
    assert summary["train_wall_s"] == pytest.approx(before + summary["train_wall_s_this_attempt"])   # ... all their time
    assert summary["completions_per_s"] == pytest.approx(summary["completions"] / summary["train_wall_s"])
