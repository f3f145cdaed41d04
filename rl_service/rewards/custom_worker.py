"""The custom reward's subprocess: `python custom_worker.py FILE FUNCTION MEMORY_MB [--own-pid-namespace]`.

Imports the user's module, then answers one JSON line per JSON request line on its stdin/stdout
(rl_service/rewards/custom.py is the parent side). Standard library only, and nothing of ours: it
is run by path, inside the sandbox (rl_service/rewards/sandbox.py), which shows of the host only the
Python installation, this file, the user's file and what `reward.custom_readable` lists.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
from pathlib import Path

_PARENT_POLL_S = 1.0



def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _call(function, request: dict, memory_mb: int) -> dict:
    try:
        value = function(request["completion"], request["answer"])
    except MemoryError:
        return {"kind": "memory", "error": f"ran out of memory (reward.custom_memory_mb={memory_mb})"}
    except BaseException as exc:  # noqa: BLE001 - SystemExit and friends from user code score 0 too
        detail = " ".join(str(exc).split())[:300]
        return {"kind": "raised", "error": f"raised {type(exc).__name__}" + (f": {detail}" if detail else "")}
    # Strings convert with float() too, but "0.5" is a bug in the function, not a reward.
    if isinstance(value, (str, bytes)) or not hasattr(type(value), "__float__"):
        return {"kind": "returned", "error": f"returned {type(value).__name__} {_describe(value)}, not a number"}
    try:
        score = float(value)
    except Exception as exc:  # noqa: BLE001 - e.g. a multi-element array
        return {"kind": "returned", "error": f"returned {type(value).__name__} that is not a number ({exc})"}
    if not math.isfinite(score):
        return {"kind": "returned", "error": f"returned {score}, not a finite number"}
    return {"score": score}


def _exit_with_parent(requests_fd: int) -> None:
    """Stop when the process that started us is gone, even if a user call is stuck in a loop: its end
    of the request pipe closes (a hang-up, seen without reading; works inside a pid namespace, where
    the parent is not visible)."""
    import select

    poller = select.poll()
    poller.register(requests_fd, 0)     # POLLHUP / POLLERR are always reported

    def watch():
        while True:
            if any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(_PARENT_POLL_S * 1000)):
                os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _end_leftovers(own_namespace: bool) -> None:
    """Kill whatever the last call forked. As pid 1 of our own pid namespace every other process in
    it is the call's; else the members of our process group."""
    if own_namespace and os.getpid() == 1:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
    else:
        me, group = os.getpid(), os.getpgrp()
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and int(entry) != me and \
                        int(Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[2]) == group:
                    os.kill(int(entry), signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                continue
    while True:   # reap them (and, as pid 1, every orphan handed to us)
        try:
            if os.waitpid(-1, 0 if own_namespace and os.getpid() == 1 else os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break


def _load_function(path: str, name: str):
    import importlib.util

    # The user's file may import its neighbours: under bubblewrap only those listed in
    # `reward.custom_readable` exist in this directory (the sandbox binds files, not the directory);
    # unconfined (`unshare`, `off`) all of them do.
    sys.path[0] = str(Path(path).parent)
    module_spec = importlib.util.spec_from_file_location("_rl_service_custom_reward", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    if not hasattr(module, name):
        raise LookupError(f"no function {name!r} in the module")
    function = getattr(module, name)
    if not callable(function):
        raise LookupError(f"{name!r} is not callable (it is {type(function).__name__} {_describe(function)})")
    import inspect

    # Called as function(completion, answer): a wrong signature made every call raise, and a run
    # trained on zero rewards to the end.
    try:
        signature = inspect.signature(function, follow_wrapped=False)   # a functools.wraps adapter is called as itself
    except (TypeError, ValueError):   # a builtin or extension callable without one: its first call says
        return function
    try:
        signature.bind("completion", "answer")
    except TypeError as exc:
        raise LookupError(f"{name}{signature} cannot be called as {name}(completion, answer) ({exc})") from None
    return function


def _worker_main(argv: list[str]) -> int:
    import resource

    path, name, memory_mb = argv[0], argv[1], int(argv[2])
    own_namespace = "--own-pid-namespace" in argv[3:]
    limit = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))   # the scratch directory cannot fill the disk
    worker_pid = os.getpid()
    # The pipes are ours: the user's prints go to stderr, and their stdin reads see nothing.
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    requests = os.fdopen(os.dup(0), "r", encoding="utf-8")
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    _exit_with_parent(requests.fileno())

    def reply(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    try:
        function = _load_function(path, name)
    except LookupError as exc:
        reply({"error": str(exc)})
        return 1
    except MemoryError:
        reply({"error": f"importing the module ran out of memory (reward.custom_memory_mb={memory_mb})"})
        return 1
    except BaseException as exc:  # noqa: BLE001 - whatever the import raised is the user's to see
        detail = " ".join(str(exc).split())[:300]
        reply({"error": f"importing the module raised {type(exc).__name__}" + (f": {detail}" if detail else "")})
        return 1
    reply({"ready": True})
    for line in requests:
        answer = _call(function, json.loads(line), memory_mb)
        if os.getpid() != worker_pid:   # a child the function forked came back here: it must not reply
            os._exit(0)
        _end_leftovers(own_namespace)
        reply(answer)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
