"""Isolation of the custom-reward subprocess (`reward.custom_sandbox`), with what Linux gives without root.

`bwrap` (bubblewrap, Debian's `bubblewrap` package, installed best effort by scripts/install.sh): the
function runs in its own user, pid, network, IPC and UTS namespaces as an unprivileged user with no
capabilities, on a read-only root that holds only the system's libraries (/usr, /lib*, the dynamic
loader's cache, the time zone), the Python installation (interpreter, standard library,
site-packages), the reward file itself and the paths listed in `reward.custom_readable`, each bound
read-only at its own path; not the reward file's directory, so its neighbours (other modules, data,
secrets) are not there unless listed. `/tmp` (also HOME and the working directory) is a scratch
tmpfs of its own, writable, at most `reward.custom_memory_mb` and gone with the process (nothing of it
is on the host's disk); `/dev` is read-only but for a `/dev/shm` of 64 MiB; a reward file under the
host's /tmp is bound inside that scratch at its own path. So no other file can be read or written (no /etc/passwd,
no runs, no ~/.ray, no tokens, nothing else of the host's /tmp), there is no network but an empty
loopback (a connection to a server on the host's 127.0.0.1 is refused), no process outside the
sandbox can be seen or signalled, and the environment is cleared (no RAY_AUTH_TOKEN). The reward
process is pid 1 of its namespace: its own children die with it, by the kernel.

`unshare` (util-linux), chosen explicitly only: user, pid and network namespaces (no network, no
signals outside, children die with it) but the file system is not confined (the function reads and
writes what this user does, path-bound Unix sockets such as Ray's included): a limit, not
isolation, for a host where bubblewrap cannot be installed. A one-line warning says so.

`auto` (the default) is bubblewrap; where it does not work `auto` refuses to run (a UserError before
Ray starts) rather than run user code with the host's files open to it. It once fell back to
unshare with a warning in a log nobody reads, and a reward then wrote to the host's `/`.
`off`: no sandbox, the process group and the resource limits only, for a function that needs the
network (a remote judge), chosen explicitly; `bwrap`: as auto. Standard library only.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("rl_service")

MODES = ("auto", "bwrap", "unshare", "off")
SCRATCH = "/tmp"            # the scratch directory as the sandboxed function sees it
SHM_BYTES = 64 * 2**20      # /dev/shm inside bubblewrap: enough for multiprocessing's semaphores, not a RAM disk
_PROBE_TIMEOUT_S = 20.0
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_warned: set[str] = set()


def _readable_roots() -> list[str]:
    """The Python installation the sandboxed interpreter needs: prefixes and site-packages directories."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             str(Path(sys.executable).resolve().parent.parent)}
    roots |= {entry for entry in sys.path if ("site-packages" in entry or "dist-packages" in entry) and os.path.isdir(entry)}
    roots = sorted(str(Path(root).resolve()) for root in roots if os.path.isdir(root))
    # A root inside another is bound with it already.
    return [root for root in roots if not any(root != other and root.startswith(other.rstrip("/") + "/")
                                             for other in roots)]


def _readable_binds(paths) -> list[tuple[str, str]]:
    """(source, destination) read-only binds of single files or directories, each at its resolved
    path, and also at its absolute path where a symlink makes that differ (a listed neighbour that is
    a link is found under the name the user gave)."""
    binds: list[tuple[str, str]] = []
    for path in paths:
        named = os.path.abspath(os.path.expanduser(path))
        real = os.path.realpath(named)
        for destination in dict.fromkeys((real, named)):
            if (real, destination) not in binds:
                binds.append((real, destination))
    return binds


def _bwrap_prefix(entry_script: str, scratch_bytes: int, readable=()) -> list[str]:
    """The bwrap command up to `--`; `readable` holds the reward file and `reward.custom_readable`."""
    command = ["bwrap", "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534", "--cap-drop", "ALL",
               "--die-with-parent", "--new-session", "--as-pid-1", "--ro-bind", "/usr", "/usr",
               # The scratch first: a reward file (or listed path) under the host's /tmp is then bound
               # inside it, at its own path. A tmpfs of bounded size: a host directory filled the disk
               # (2.4 GB in one call) and outlived a killed run.
               *_sized(scratch_bytes), "--tmpfs", SCRATCH]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):       # merged /usr: the same links as the host
            command += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            command += ["--ro-bind", top, top]
    # The dynamic loader's cache and the time zone; nothing else of /etc (no passwd, no hosts).
    for name in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime"):
        command += ["--ro-bind-try", name, name]
    for root in _readable_roots():
        command += ["--ro-bind", root, root]
    # Then each readable path at its own path: the entry script, the reward file (never its
    # directory) and what reward.custom_readable lists.
    for source, destination in _readable_binds([entry_script, *readable]):
        command += ["--ro-bind", source, destination]
    # /dev's own tmpfs took 1.2 GB of RAM: read-only, with a small /dev/shm (the devices still work).
    command += ["--proc", "/proc", "--dev", "/dev", *_sized(SHM_BYTES), "--tmpfs", "/dev/shm",
                "--remount-ro", "/dev", "--chdir", SCRATCH, "--remount-ro", "/", "--clearenv"]
    for name, value in _clean_environment(SCRATCH).items():
        command += ["--setenv", name, value]
    return command + ["--"]


@functools.lru_cache(maxsize=None)
def _bwrap_sizes_tmpfs() -> bool:
    """bubblewrap ≥ 0.7 takes `--size` for a tmpfs; Ubuntu 22.04's 0.6 and a setuid bwrap do not."""
    try:
        usage = subprocess.run(["bwrap", "--help"], capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--size" in usage.stdout + usage.stderr


def _sized(size_bytes: int) -> list[str]:
    """`--size N` before a `--tmpfs` where bwrap takes it; older ones get an unsized tmpfs, which
    RLIMIT_FSIZE bounds per file only (custom_worker.py), and a warning once."""
    if _bwrap_sizes_tmpfs():
        return ["--size", str(size_bytes)]
    if "size" not in _warned:
        _warned.add("size")
        log.warning("bubblewrap here is older than 0.7 (no --size): the custom reward's scratch /tmp and /dev/shm "
                    "are bounded per file (reward.custom_memory_mb), not in total")
    return []


def _clean_environment(scratch: str) -> dict[str, str]:
    """All a sandboxed reward sees of the environment: no RAY_AUTH_TOKEN, cloud keys or the run's paths."""
    environment = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch,
                   "PYTHONDONTWRITEBYTECODE": "1", **dict.fromkeys(_THREAD_VARIABLES, "1")}
    for name in ("LANG", "LC_ALL", *_THREAD_VARIABLES):
        if os.environ.get(name):
            environment[name] = os.environ[name]
    return environment


_UNSHARE_PREFIX = ["unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child", "--mount-proc",
                   "--"]


@functools.lru_cache(maxsize=None)
def _works(kind: str) -> str | None:
    """None when `kind` can start Python here, else why not (missing, user namespaces refused, ...)."""
    tool = "bwrap" if kind == "bwrap" else "unshare"
    if shutil.which(tool) is None:
        return f"{tool} is not installed"
    try:
        prefix = (_bwrap_prefix(__file__, 2**20) if kind == "bwrap" else _UNSHARE_PREFIX)
        probe = subprocess.run(prefix + [sys.executable, "-c", "import os; assert os.getpid() == 1"],
                               capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{tool} failed ({exc})"
    if probe.returncode != 0:
        detail = " ".join(probe.stderr.split())[:200]
        return f"{tool} could not start a sandbox ({detail or f'exit {probe.returncode}'})"
    return None


def choose(mode: str) -> str:
    """The isolation to use for `mode`: "bwrap", "unshare" (mode "unshare" only) or "none" (mode "off"
    only). Raises RuntimeError where the mode's sandbox does not work: `auto` never runs user code with
    the host's files open to it."""
    if mode == "off":
        return "none"
    if mode == "unshare":
        problem = _works("unshare")
        if problem is not None:
            raise RuntimeError(f"reward.custom_sandbox is unshare but {problem}")
        if "unshare" not in _warned:
            _warned.add("unshare")
            log.warning("reward.custom_sandbox: unshare takes the custom reward's network, signals and environment "
                        "away, but NOT its file access (files and path-bound Unix sockets such as Ray's): use "
                        "bubblewrap (reward.custom_sandbox: auto) to confine it")
        return "unshare"
    problem = _works("bwrap")
    if problem is None:
        return "bwrap"
    raise RuntimeError(f"reward.custom_sandbox is {mode} but {problem}: install bubblewrap (Debian: apt-get install "
                       "bubblewrap) and allow user namespaces; or choose reward.custom_sandbox: unshare (no network "
                       "or signals, files NOT confined) or off (unconfined: time and memory limits only)")


def _make_scratch() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="rl_reward_")


def sandboxed_command(kind: str, argv: list[str], entry_script: str, reward_file: str,
                      readable=(), scratch_bytes: int = 2**30) -> tuple[list[str], str | None, dict]:
    """(command, host scratch directory or None, environment) running `argv` (the interpreter and the
    entry script first) isolated as `kind`; under bwrap the function can read, besides the Python
    installation, only `reward_file` and the paths in `readable` (`reward.custom_readable`, absolute),
    and writes to a tmpfs of `scratch_bytes`, none of it on the host. The caller removes a host
    scratch directory when the process is gone."""
    if kind == "bwrap":   # bwrap clears the environment and sets its own (_bwrap_prefix)
        return (_bwrap_prefix(entry_script, scratch_bytes, [reward_file, *readable]) + argv + ["--own-pid-namespace"],
                None, _clean_environment(SCRATCH))
    scratch = _make_scratch()
    if kind == "unshare":
        return _UNSHARE_PREFIX + argv + ["--own-pid-namespace"], scratch, _clean_environment(scratch)
    # No sandbox (`off`, for a function that calls a remote judge and may need its key): this user's
    # environment, with the scratch directory as home.
    environment = {**os.environ, "HOME": scratch, "TMPDIR": scratch}
    for name in _THREAD_VARIABLES:
        environment.setdefault(name, "1")   # one call at a time: threads would only reserve address space
    return list(argv), scratch, environment
