"""SIGTERM (`rl-service stop`, Ray's job stop, a scheduler's preemption) ends a run with one line.

Ray's job stop sends SIGTERM and, 3 seconds later, SIGKILL: too short to finish a step and write a
checkpoint. Without a handler the driver died in Ray's C++ failure handler (a stack dump as the
log's last lines, nothing from us). With it, the run stops where it is, the line says which
checkpoint a resume continues from, and Ray is shut down on the way out. Checkpoints are written
to a temporary name and renamed, so one cut short is never the newest.
"""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rl_service.progress import run_dir_log


def resume_hint(run_dir: Path) -> str:
    """`RUN_DIR: newest checkpoint step_N: continue with ...`, or `RUN_DIR: no checkpoint yet`."""
    from rl_service.driver.run_dir import latest_checkpoint

    from rl_service.run_ids import SUBMITTED_JOB_ID as job_id   # a submitted job is resumed as a job, on its cluster

    checkpoint = latest_checkpoint(run_dir)
    command = f"rl-service resume {job_id}" if job_id else f"rl-service resume {run_dir}"
    resume = f"newest checkpoint {checkpoint.name}: continue with `{command}`" if checkpoint else "no checkpoint yet"
    return f"{run_dir}: {resume}"


class StopRequested(BaseException):
    """Raised in the driver's main thread by SIGTERM. A BaseException: the role-failure recovery
    (`run_with_restarts`, which catches Exception) must not take it for a dead role."""

    def __init__(self, run_dir: Path):
        super().__init__(f"stopped by SIGTERM; {resume_hint(run_dir)}")


_REQUESTED: list[StopRequested] = []


def stop_requested() -> StopRequested | None:
    """The stop SIGTERM asked for in this process, if one did. Raised from a signal handler inside
    Ray's C++ code (a `ray.get` while the roles start) the exception can come out as another one
    (a SystemError "returned a result with an exception set"): whatever escapes after a stop is the
    stop's doing."""
    return _REQUESTED[0] if _REQUESTED else None


@contextmanager
def stop_on_sigterm(run_dir: Path) -> Iterator[None]:
    """Within the block, SIGTERM raises `StopRequested` in the main thread (call it after Ray has
    started: `ray.init` installs handlers of its own). Elsewhere than the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    _REQUESTED.clear()   # a process may run several sessions (benchmarks, tests): only this one's stop counts
    stopping = False

    def stop(_signum, _frame):
        # Once stopping, a second SIGTERM (stop pressed twice) must not cut the roles' and Ray's shutdown
        # short: ignored from here to the process's end (Ray's own handler exits at once, with status 15).
        nonlocal stopping
        stopping = True
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop = StopRequested(Path(run_dir))
        _REQUESTED.append(stop)
        # Said now: shutting the roles and Ray down may outlast the 3 s before Ray's SIGKILL.
        print(f"rl-service: {stop}", file=sys.stderr, flush=True)
        run_dir_log.error("%s", stop)
        raise stop

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        if not stopping:
            signal.signal(signal.SIGTERM, previous)
