"""Custom reward functions: `reward.custom: "path/to/file.py:function_name"`.

The function is called once per completion as::

    fn(completion: str, answer: str) -> float

`completion` is the whole generated text (reasoning trace included; `final_answer_text` in
`rl_service.rewards.verifiers` shows how the built-in verifiers cut out the answer) and `answer` the
prompt's gold answer from the dataset, as a string. Any real number (int, float, bool, numpy
scalar) is a reward; it replaces the verifier's in training (the RewardActor's `verifier_only`
keeps evaluation on the verifier, so eval accuracy stays an accuracy).

User code never runs in the RewardActor's process: it runs in one long-lived subprocess per
`CustomRewardRunner`, started with the actor and started again after it dies or times out. The two
talk JSON lines over pipes (no pickle of user data). The subprocess is sandboxed
(`reward.custom_sandbox`, rl_service/rewards/sandbox.py: with bubblewrap it reads only the Python
installation, the reward file itself and the paths in `reward.custom_readable`, not the file's
directory, and writes only a scratch /tmp; no network, no signals out; where bubblewrap does not
work `auto` refuses to run, and only an explicit `unshare` (files not confined) or `off` runs it), in its own process
group (killed whole at the time limit; whatever a call forked is killed when the call returns),
with an address-space and file-size limit (`RLIMIT_AS`, `RLIMIT_FSIZE`: `reward.custom_memory_mb`)
and each call a time limit (`reward.custom_timeout_s`).
A call that raises, returns something that is not a finite number, runs past its limit, runs out
of memory or kills its process scores 0 and is counted (`COUNTER_KEYS`); the first of each kind is
logged with its message, later ones only counted.

`check_custom_reward` finds what can be known before Ray starts (file, syntax, function) and raises
a one-line `UserError` naming `reward.custom` (or `reward.custom_readable[i]`, or the sandbox that
`reward.custom_sandbox` asks for and this machine lacks). The subprocess's side is custom_worker.py.
"""
from __future__ import annotations

import ast
import json
import logging
import math
import os
import re
import select
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

log = logging.getLogger("rl_service")

FIELD = "reward.custom"
COUNTER_KEYS = ("custom_reward_errors", "custom_reward_timeouts", "custom_reward_restarts")
# Importing the user's module may load heavy libraries (sympy, numpy): allowed more than one call.
STARTUP_TIMEOUT_S = 60.0
# Kinds of failure (each logged once); "timeout" is counted apart, the rest are errors. After these
# the subprocess is stuck, gone or in doubt, so it is replaced before the next call.
_TIMEOUT = "timeout"
_RESTART_AFTER = frozenset({_TIMEOUT, "died", "protocol", "memory"})
# What the function prints goes to this process's stderr (the reward actor's log), up to this much
# per subprocess; 300 MB in six calls once flooded the driver's console.
OUTPUT_LIMIT_BYTES = 1 << 20


@dataclass(frozen=True)
class CustomRewardSpec:
    """A parsed `reward.custom`: the absolute file path, the function name, the limits and the
    absolute paths the function may read besides its file (`reward.custom_readable`)."""
    path: str
    function: str
    timeout_s: float = 5.0
    memory_mb: int = 1024
    sandbox: str = "auto"          # reward.custom_sandbox: auto, bwrap, unshare or off
    readable: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.path}:{self.function}"


def parse_custom_reward(value: str, timeout_s: float = 5.0, memory_mb: int = 1024,
                        sandbox: str = "auto", readable: Sequence[str] = ()) -> CustomRewardSpec:
    """`"dir/file.py:name"` → a spec with an absolute path (relative paths, also those of `readable`,
    are from the working directory, like the data paths). Checks the form only, not the files."""
    path, separator, function = value.rpartition(":")
    if not separator or not path or not function.isidentifier():
        raise _user_error(f"{value!r} must be 'path/to/file.py:function_name'")
    if not path.endswith(".py"):
        raise _user_error(f"{path} must be a .py file (got {value!r}; expected 'path/to/file.py:function_name')")
    return CustomRewardSpec(str(Path(path).expanduser().resolve()), function, timeout_s, memory_mb, sandbox,
                            tuple(os.path.abspath(os.path.expanduser(entry)) for entry in readable))


def custom_reward_spec(reward_config) -> CustomRewardSpec | None:
    """The spec of a `RewardConfig`, or None when it names no custom function."""
    if not reward_config.custom:
        return None
    return parse_custom_reward(reward_config.custom, reward_config.custom_timeout_s, reward_config.custom_memory_mb,
                               reward_config.custom_sandbox, reward_config.custom_readable)


def check_custom_reward(spec: CustomRewardSpec) -> None:
    """Raise a one-line UserError if the file is missing, does not parse, a `reward.custom_readable`
    path is missing, the sandbox asked for does not work here, or (imported in a subprocess in the
    same sandbox and under the same limits) the module has no callable `spec.function`."""
    file, shown = Path(spec.path), _shown(spec.path)
    try:
        is_file = file.is_file()
    except OSError as exc:   # a directory above it that cannot be entered
        raise _user_error(f"{shown}: cannot read ({exc.strerror or exc})") from None
    if not is_file:
        raise _user_error(f"{shown}: file not found")
    for index, entry in enumerate(spec.readable):   # checked at config load too; a spec may be built by hand
        if not os.path.exists(entry):
            from rl_service.errors import UserError

            raise UserError(f"reward.custom_readable[{index}]: {_shown(entry)}: no such file or directory")
    try:
        source = file.read_bytes()
        ast.parse(source, filename=str(file))
    except SyntaxError as exc:
        line = exc.lineno
        if line is None and b"\0" in source:   # Python names no line for a NUL byte
            line = source.count(b"\n", 0, source.index(b"\0")) + 1
        raise _user_error(f"{shown}:{line}: {exc.msg}" if line else f"{shown}: {exc.msg}") from None
    except (OSError, ValueError) as exc:  # unreadable, or NUL bytes / undecodable source
        raise _user_error(f"{shown}: cannot read as Python ({exc})") from None
    worker = _Worker(spec)
    try:
        problem = worker.start()
    finally:
        worker.stop()
    if problem is not None:
        raise _user_error(f"{shown}: {problem}")


def _import_hint(problem: str, reward_file: str) -> str:
    """`problem` plus how to fix a module the sandbox hid: the reward file's directory is not visible
    under bubblewrap, so a helper beside it imports only when listed in reward.custom_readable."""
    missing = re.search(r"importing the module raised ModuleNotFoundError: No module named '([\w.]+)'", problem)
    if missing is None:
        return problem
    top = missing.group(1).split(".")[0]
    beside = Path(reward_file).parent
    for candidate in (beside / f"{top}.py", beside / top):
        if candidate.exists():
            return f"{problem} (a module beside the reward file is importable only when listed in " \
                   f"reward.custom_readable: add {_shown(str(candidate))})"
    return f"{problem} (a module beside the reward file must be listed in reward.custom_readable; a package must " \
           "be installed in this Python)"


def _shown(path: str) -> str:
    """A path as the user likely wrote it: relative to the working directory when under it."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def _user_error(message: str):
    from rl_service.errors import UserError  # lazily: the subprocess entry point imports nothing of ours

    return UserError(f"{FIELD}: {message}")


# -- the parent side ------------------------------------------------------------------------------

class _Worker:
    """One subprocess running the user's function; every wait on it has a deadline."""

    def __init__(self, spec: CustomRewardSpec):
        self.spec = spec
        self.process: subprocess.Popen | None = None
        self.scratch: str | None = None
        self._buffer = bytearray()
        self._output_done = threading.Event()

    def start(self) -> str | None:
        """Start the subprocess and import the function; None when ready, else what went wrong."""
        from rl_service.rewards.sandbox import choose, sandboxed_command

        try:
            kind = choose(self.spec.sandbox)
        except RuntimeError as exc:
            return str(exc)
        entry = str(Path(__file__).resolve().with_name("custom_worker.py"))
        command, self.scratch, env = sandboxed_command(
            kind, [sys.executable, entry, self.spec.path, self.spec.function, str(self.spec.memory_mb)], entry,
            self.spec.path, self.spec.readable, scratch_bytes=self.spec.memory_mb * 2**20)
        # Its own session and process group: a time-out kills the whole group (in a sandbox, the
        # namespace's pid 1 dies with it and takes every process inside along). Its stderr is a pipe,
        # not this process's log file, which it could read and truncate through /proc/self/fd/2.
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        env=env, cwd=self.scratch or "/", close_fds=True, start_new_session=True)
        self._output_done = threading.Event()
        _forward_output(self.process.stderr, OUTPUT_LIMIT_BYTES, str(self.spec), self._output_done)
        self._buffer.clear()
        reply = self._read_reply(time.monotonic() + max(STARTUP_TIMEOUT_S, self.spec.timeout_s))
        if reply is None:
            return f"importing the module took more than {max(STARTUP_TIMEOUT_S, self.spec.timeout_s):.0f} s"
        if "ready" not in reply:
            return _import_hint(reply.get("error", "the reward process stopped while importing the module"),
                                self.spec.path)
        return None

    def call(self, completion: str, answer: str) -> dict | None:
        """The reply to one call ({"score"} or {"kind", "error"}), or None past the time limit."""
        request = json.dumps({"completion": completion, "answer": answer}) + "\n"
        try:
            self.process.stdin.write(request.encode("utf-8"))
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            return self._died()
        return self._read_reply(time.monotonic() + self.spec.timeout_s)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None:
            return
        self._kill_group()
        self.process.wait()
        # stderr is the forwarding thread's to close: closing it here waited on that thread's read,
        # for ever where a process the reward forked out of the group (sandbox off) still held it.
        self._output_done.set()
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        self.process = None
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None

    def _kill_group(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)   # the group leader's pid names the group
        except (ProcessLookupError, PermissionError):
            pass

    def _died(self) -> dict:
        try:
            code = self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:  # closed its pipe but lives on: finish it
            self._kill_group()
            code = self.process.wait()
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return {"kind": "died", "error": f"the reward process {how}"}

    def _read_reply(self, deadline: float) -> dict | None:
        """The next JSON line from the subprocess; None past the deadline; a "died" reply at EOF."""
        fd = self.process.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    return None
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return self._died()
                self._buffer.extend(chunk)
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer[:] = rest
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            return {"kind": "protocol", "error": f"unreadable reply from the reward process: {line[:200]!r}"}
        return reply


def _forward_output(pipe, limit: int, name: str, done: threading.Event) -> None:
    """Copy what the reward process prints to this process's stderr (fd 2, where it printed before),
    up to `limit` bytes, then one line saying the rest is dropped; the pipe is drained either way, so
    the process never blocks on a full pipe. A daemon thread that closes the pipe at its end, or once
    `done` is set and nothing more is waiting in it."""
    fd = pipe.fileno()

    def copy():
        forwarded = 0
        try:
            while True:
                if not select.select([fd], [], [], 0.0 if done.is_set() else 0.2)[0]:
                    if done.is_set():
                        break
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                if forwarded < limit:
                    kept = chunk[:limit - forwarded]
                    os.write(2, kept)
                    forwarded += len(kept)
                    if forwarded >= limit:
                        os.write(2, f"\n[{name}: output beyond {limit} bytes dropped]\n".encode())
        except (OSError, ValueError):
            pass
        finally:
            pipe.close()

    threading.Thread(target=copy, name="custom-reward-output", daemon=True).start()


class CustomRewardRunner:
    """Scores completions with a user function in a time- and memory-limited subprocess.

    `score` returns the rewards and this call's counts of errors and timeouts; `totals` keeps
    the counts over the runner's life. Call `close` to stop the subprocess (it also stops by
    itself within a second of this process exiting).
    """

    def __init__(self, spec: CustomRewardSpec):
        self.spec = spec
        self.totals = dict.fromkeys(COUNTER_KEYS, 0)
        self.starts = 0                      # subprocesses started: 1 + restarts
        self._worker: _Worker | None = None
        self._logged_kinds: set[str] = set()
        self._ensure_worker()  # a failure here is reported by the first `score`, which tries again

    def score(self, completions: Sequence[str], answers: Sequence[str]) -> tuple[list[float], dict[str, int]]:
        """One reward per completion, in order, and {counter: count} for this call."""
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        counts = dict.fromkeys(COUNTER_KEYS, 0)
        starts = self.starts
        rewards: list[float] = []
        start_failure: dict | None = None
        for completion, answer in zip(completions, answers):
            if start_failure is None:
                start_failure = self._ensure_worker()
            # A module that will not import fails every call of this batch; one restart per batch.
            reply = start_failure or self._worker.call(str(completion), str(answer))
            if reply is None:
                reply = {"kind": _TIMEOUT, "error": f"took more than {self.spec.timeout_s:g} s "
                                                    f"(reward.custom_timeout_s)"}
            reward, problem = _reward_of(reply)
            if problem is not None:
                kind = problem["kind"]
                counts["custom_reward_timeouts" if kind == _TIMEOUT else "custom_reward_errors"] += 1
                self._log_once(kind, problem["error"])
                if kind in _RESTART_AFTER:
                    self._stop_worker()
            rewards.append(reward)
        # Processes started again after a timeout, a crash or a kill (the first start is not a restart).
        counts["custom_reward_restarts"] = self.starts - starts
        for key, value in counts.items():
            self.totals[key] += value
        return rewards, counts

    def close(self) -> None:
        self._stop_worker()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the subprocess exits on its own
            pass

    def _ensure_worker(self) -> dict | None:
        if self._worker is not None and self._worker.alive():
            return None
        self._stop_worker()
        self._worker = _Worker(self.spec)
        self.starts += 1
        problem = self._worker.start()
        if problem is None:
            return None
        self._stop_worker()
        return {"kind": "start", "error": problem}

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    def _log_once(self, kind: str, message: str) -> None:
        if kind in self._logged_kinds:
            return
        self._logged_kinds.add(kind)
        counter = "custom_reward_timeouts" if kind == _TIMEOUT else "custom_reward_errors"
        log.warning("reward.custom %s %s; the completion scores 0 (logged once per kind of failure, "
                    "all counted in %s)", self.spec, message, counter)


def _reward_of(reply: dict) -> tuple[float, dict | None]:
    """(reward, None) for a good reply, (0.0, the reply) for a failed one."""
    if "score" not in reply:
        return 0.0, {"kind": reply.get("kind", "error"), "error": reply.get("error", "failed")}
    score = reply["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return 0.0, {"kind": "returned", "error": f"returned {score!r}, not a finite number"}
    return float(score), None
