"""The custom reward's sandbox (rl_service/rewards/sandbox.py), one test per escape of issue #19's
finding 3: write a file, read /etc/passwd, connect to a server on 127.0.0.1, kill the parent,
fork children that outlive the time limit, and a reward of 1e308. Each escape is tried for real by a
reward function; it must fail, score 0 and be counted, and leave the host as it was. Then `auto`
refuses to run without bubblewrap, and the sandbox's resources (scratch, /dev/shm, output) are
bounded. What the reward may read: tests/test_reward_sandbox_paths.py.
"""
from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO
from rl_service.errors import UserError
from rl_service.rewards.custom import CustomRewardRunner, CustomRewardSpec, check_custom_reward
from rl_service.rewards.sandbox import _works, choose
from rl_service.rewards.verifiers import clip_rewards
from test_custom_reward import _all_gone, reward_processes

needs_bwrap = pytest.mark.skipif(_works("bwrap") is not None, reason=f"no working bubblewrap here: {_works('bwrap')}")


def _unconfined() -> bool:
    """No working bubblewrap on this machine: `auto` refuses to run, only `unshare` or `off` run a reward."""
    return _works("bwrap") is not None

ESCAPES = '''
import os, signal, socket, time

def write_outside(completion, answer):
    with open(answer, "w") as target:          # a path on the host, outside the scratch directory
        target.write("escaped")
    return 1.0

def write_scratch(completion, answer):
    with open("/tmp/allowed", "w") as scratch:  # the sandbox's own /tmp: allowed, thrown away
        scratch.write("fine")
    return float(open("/tmp/allowed").read() == "fine")

def read_environment(completion, answer):
    return float(answer in os.environ)          # a secret of the host's environment (RAY_AUTH_TOKEN, ...)

def read_passwd(completion, answer):
    return float(len(open("/etc/passwd").read()) > 0)

def connect(completion, answer):
    with socket.create_connection(("127.0.0.1", int(answer)), timeout=2) as connection:
        connection.sendall(b"escaped")
    return 1.0

def kill_parent(completion, answer):
    # The runner's pid (handed over in the answer), then whatever this process's parent is; each
    # attempt runs whatever the other did, and the function returns as if both had worked.
    for target in (int(answer), os.getppid()):
        try:
            os.kill(target, signal.SIGKILL)
        except OSError:
            pass
    return 1.0

def fork_and_hang(completion, answer):
    for _ in range(4):
        if os.fork() == 0:
            os.setsid()                        # even out of the process group
            while True:
                pass
    if completion == "hang":
        time.sleep(30)                         # past the 1 s limit
    return 1.0

def huge(completion, answer):
    return 1e308

def fill_scratch(completion, answer):
    # Files of 16 MiB (under the 64 MiB per-file limit), written 1 MiB at a time (the address space
    # is 64 MiB too), into the scratch, then into /dev/shm: 1.0 when both stopped short of what was
    # asked (no space).
    stopped, chunk = 0, bytes(2**20)
    for directory, files in (("/tmp", 12), ("/dev/shm", 6)):
        try:
            for index in range(files):
                with open(f"{directory}/fill{index}", "wb") as target:
                    for _ in range(16):
                        target.write(chunk)
        except OSError:
            stopped += 1
    return float(stopped == 2)

def read_log(completion, answer):
    # The file this process prints to, through /proc: 1.0 if it read the host's log, 0.5 if it could
    # truncate it, 0.0 if neither because it is a pipe (opening a pipe's read end would block).
    if os.readlink("/proc/self/fd/2").startswith("pipe:"):
        return 0.0
    try:
        if answer in open("/proc/self/fd/2").read():
            return 1.0
    except OSError:
        pass
    try:
        open("/proc/self/fd/2", "w").close()
        return 0.5
    except OSError:
        return -1.0

def escape_holding_stderr(completion, answer):
    # Out of the process group, holding the reward's stderr open: `off` cannot kill it with the call.
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            time.sleep(25)
        os._exit(0)
    return 1.0

def flood(completion, answer):
    for _ in range(64):
        print("x" * 65535)
    return 1.0
'''


@pytest.fixture
def escapes(tmp_path):
    (tmp_path / "escapes.py").write_text(ESCAPES)
    return lambda function: CustomRewardSpec(str(tmp_path / "escapes.py"), function, timeout_s=1.0, memory_mb=256)


def _score(spec: CustomRewardSpec, completion: str = "x", answer: str = "") -> tuple[float, dict]:
    runner = CustomRewardRunner(spec)
    try:
        rewards, counts = runner.score([completion], [answer])
    finally:
        runner.close()
    return rewards[0], counts


@needs_bwrap
def test_auto_picks_bubblewrap_where_it_works():
    assert choose("auto") == "bwrap" and choose("off") == "none"


@needs_bwrap
def test_no_write_outside_the_scratch_directory(escapes, tmp_path):
    import tempfile

    # A host directory outside /tmp (the sandbox has no /var/tmp, and its root is read-only): the write fails.
    outside = Path(tempfile.mkdtemp(prefix="rl_sandbox_test_", dir="/var/tmp" if os.access("/var/tmp", os.W_OK)
                                    else Path.home()))
    try:
        target = outside / "escaped.txt"
        assert _score(escapes("write_outside"), answer=str(target)) == (0.0, {"custom_reward_errors": 1,
                                                                              "custom_reward_timeouts": 0,
                                       "custom_reward_restarts": 0})
        assert not target.exists()
    finally:
        shutil.rmtree(outside, ignore_errors=True)
    # A path under the host's /tmp (the reward file's folder here) is, inside, a path in the scratch
    # /tmp, which hides the host's: the write lands in the scratch and the host file never appears.
    target = tmp_path / "escaped.txt"
    _score(escapes("write_outside"), answer=str(target))
    assert not target.exists()
    # /tmp inside is the scratch directory: writable, and gone with the process.
    assert _score(escapes("write_scratch"))[0] == 1.0
    assert not list(tmp_path.glob("**/allowed"))


@needs_bwrap
def test_no_read_of_etc_passwd(escapes):
    assert _score(escapes("read_passwd")) == (0.0, {"custom_reward_errors": 1, "custom_reward_timeouts": 0,
                                   "custom_reward_restarts": 0})
    # The same function unsandboxed reads it: the test would catch a sandbox that stopped isolating.
    off = CustomRewardSpec(escapes("read_passwd").path, "read_passwd", 1.0, 256, "off")
    assert _score(off)[0] == 1.0


@pytest.mark.parametrize("kind", ["bwrap", "unshare"])
def test_no_secret_of_the_environment_reaches_the_reward(escapes, monkeypatch, kind):
    from rl_service.rewards import sandbox

    if sandbox._works(kind) is not None:
        pytest.skip(f"{kind} does not work here: {sandbox._works(kind)}")
    monkeypatch.setenv("RL_SERVICE_TEST_SECRET", "s3cret")
    monkeypatch.setattr(sandbox, "choose", lambda mode: kind if mode != "off" else "none")
    assert _score(escapes("read_environment"), answer="RL_SERVICE_TEST_SECRET")[0] == 0.0
    off = CustomRewardSpec(escapes("read_environment").path, "read_environment", 1.0, 256, "off")
    assert _score(off, answer="RL_SERVICE_TEST_SECRET")[0] == 1.0   # unsandboxed it is there


def test_no_connection_to_a_server_on_loopback(escapes):
    if _unconfined():
        pytest.skip("no namespaces on this machine: the network is not isolated (warned at run time)")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        assert _score(escapes("connect"), answer=str(port)) == (0.0, {"custom_reward_errors": 1,
                                                                      "custom_reward_timeouts": 0,
                                   "custom_reward_restarts": 0})
        with pytest.raises(socket.timeout):
            server.accept()


def test_the_parent_cannot_be_killed(escapes):
    if _unconfined():
        pytest.skip("no pid namespace on this machine: signals are not isolated (warned at run time)")
    spec = escapes("kill_parent")
    # The runner's process is a child of this test, so a kill that got through ends it, not pytest.
    parent = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            import os
            from rl_service.rewards.custom import CustomRewardRunner, CustomRewardSpec
            runner = CustomRewardRunner(CustomRewardSpec({spec.path!r}, "kill_parent", 1.0, 256))
            print(runner.score(["x", "y"], [str(os.getpid())] * 2))
            print(runner.score(["x"], [str(os.getpid())]))
            runner.close()
        """)], cwd=REPO, capture_output=True, text=True, timeout=60)
    # Unsandboxed, the first kill ends the runner's process (exit -9). Sandboxed, the host pid does not
    # exist in the reward's pid namespace and its parent is nobody (getppid() is 0: the kill goes to
    # its own group, which pid 1 of a namespace ignores), so it returns 1.0 and the runner lives on.
    assert parent.returncode == 0, (parent.returncode, parent.stderr)
    counts = "{'custom_reward_errors': 0, 'custom_reward_timeouts': 0, 'custom_reward_restarts': 0}"
    assert f"([1.0, 1.0], {counts})" in parent.stdout and f"([1.0], {counts})" in parent.stdout, parent.stdout


@pytest.mark.parametrize("completion", ["hang", "return"])
def test_forked_children_do_not_outlive_the_call_or_the_time_limit(escapes, completion):
    if _unconfined():
        pytest.skip("no pid namespace on this machine: a child that leaves the process group survives")
    spec = escapes("fork_and_hang")
    runner = CustomRewardRunner(spec)
    try:
        alive_before = len(reward_processes(spec.path))   # the sandbox and the reward process
        rewards, counts = runner.score([completion], ["0"])
        if completion == "hang":     # cut at the limit: the process and its four children, all gone
            assert (rewards, counts["custom_reward_timeouts"]) == ([0.0], 1)
            assert _all_gone(spec.path, within_s=2)
        else:                        # returned: the reward stands, the four children are killed
            assert rewards == [1.0]
            time.sleep(0.2)
            assert len(reward_processes(spec.path)) == alive_before
    finally:
        runner.close()
    assert _all_gone(spec.path, within_s=2)


def test_a_reward_of_1e308_is_clipped_and_counted(escapes):
    assert _score(escapes("huge")) == (1e308, {"custom_reward_errors": 0, "custom_reward_timeouts": 0,
                                   "custom_reward_restarts": 0})
    # The RewardActor clips what the function returned to reward.clip (tested through Ray in
    # test_custom_reward.py); here the rule itself, checked by hand.
    assert clip_rewards([1e308, -1e308, 0.5, math.nan, math.inf, 2.0], -1.0, 2.0) == ([2.0, -1.0, 0.5, 0.0, 0.0, 2.0], 4)
    assert clip_rewards([], -1.0, 1.0) == ([], 0)


def test_unshare_chosen_explicitly_still_takes_network_signals_and_children(escapes, monkeypatch, caplog):
    """Where bubblewrap is missing, `auto` refuses (it once fell back to `unshare`, and a reward wrote to
    the host's /); `unshare` chosen explicitly isolates what it can, and says what it cannot."""
    import dataclasses
    import logging

    from rl_service.rewards import sandbox

    if sandbox._works("unshare") is not None:
        pytest.skip(f"unshare cannot make namespaces here: {sandbox._works('unshare')}")
    monkeypatch.setattr(sandbox, "_works", lambda kind: "bwrap is not installed" if kind == "bwrap" else None)
    monkeypatch.setattr(sandbox, "_warned", set())
    with pytest.raises(RuntimeError, match="custom_sandbox is auto but bwrap is not installed"):
        sandbox.choose("auto")
    with caplog.at_level(logging.WARNING, logger="rl_service"):
        assert sandbox.choose("unshare") == "unshare"
    assert any("NOT its file access" in record.getMessage() and "environment" in record.getMessage()
               for record in caplog.records)
    unshared = lambda name: dataclasses.replace(escapes(name), sandbox="unshare")   # noqa: E731
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert _score(unshared("connect"), answer=str(server.getsockname()[1]))[1]["custom_reward_errors"] == 1
    spec = unshared("fork_and_hang")
    runner = CustomRewardRunner(spec)
    try:
        assert runner.score(["hang"], ["0"])[1]["custom_reward_timeouts"] == 1
        assert _all_gone(spec.path, within_s=2)       # the four setsid children too: they were in its pid namespace
    finally:
        runner.close()
    with pytest.raises(RuntimeError, match="apt-get install bubblewrap"):
        sandbox.choose("bwrap")


# -- the review's finding 2: no silent unconfined run ----------------------------------------------

@pytest.fixture
def no_namespace_tools(monkeypatch):
    """A machine without bubblewrap or unshare. Patched at the edge, the presence of the system tools
    (`shutil.which` as the sandbox module sees it, nowhere else): `_works`, `choose` and everything
    after them run for real. `_works` caches its probes, so the cache is cleared before and after."""
    import types

    from rl_service.rewards import sandbox

    monkeypatch.setattr(sandbox, "shutil", types.SimpleNamespace(which=lambda name, *args, **kwargs: None,
                                                                 rmtree=shutil.rmtree))
    sandbox._works.cache_clear()
    yield
    monkeypatch.undo()
    sandbox._works.cache_clear()


def test_auto_refuses_to_run_unconfined_and_off_still_runs(no_namespace_tools, escapes, capsys, monkeypatch):
    from rl_service.cli import main

    assert _works("bwrap") == "bwrap is not installed" and _works("unshare") == "unshare is not installed"
    with pytest.raises(RuntimeError, match=r"auto but bwrap is not installed.*apt-get install bubblewrap.*"
                                           r"reward\.custom_sandbox: unshare.*NOT confined.*or off"):
        choose("auto")
    # Before Ray starts: the check (run by `validate` and `run`) is a one-line UserError.
    with pytest.raises(UserError, match="reward.custom_sandbox is auto but bwrap is not installed"):
        check_custom_reward(escapes("read_passwd"))
    monkeypatch.chdir(REPO)
    assert main(["validate", "configs/custom_reward_example.yaml"]) == 2
    assert "install bubblewrap" in capsys.readouterr().err
    # A runner asked for auto starts nothing: every call scores 0 and is counted.
    assert _score(escapes("huge"))[1]["custom_reward_errors"] == 1
    # `off`, chosen explicitly, still runs the function unconfined.
    assert choose("off") == "none"
    off = CustomRewardSpec(escapes("read_passwd").path, "read_passwd", 1.0, 256, "off")
    check_custom_reward(off)
    assert _score(off)[0] == 1.0
    assert main(["validate", "configs/custom_reward_example.yaml", "--set", "reward.custom_sandbox=off"]) == 0


# -- a later review: resources the sandbox shares with the host ----------------------------------

@needs_bwrap
def test_the_scratch_and_dev_shm_are_bounded_and_leave_nothing_on_the_host(escapes):
    # The scratch was a host directory: 2.4 GB written in one call, left behind after a kill; /dev's
    # tmpfs took 1.2 GB of RAM.
    import dataclasses
    import glob

    before = set(glob.glob("/tmp/rl_reward_*"))
    spec = dataclasses.replace(escapes("fill_scratch"), memory_mb=64, timeout_s=30.0)
    assert _score(spec) == (1.0, {"custom_reward_errors": 0, "custom_reward_timeouts": 0, "custom_reward_restarts": 0})
    assert set(glob.glob("/tmp/rl_reward_*")) == before


@needs_bwrap
def test_the_reward_neither_reads_nor_truncates_the_log_it_prints_to_and_its_output_is_capped(escapes, tmp_path):
    spec = escapes("read_log")
    log = tmp_path / "actor.log"
    log.write_text("SECRET-IN-LOG\n")
    script = textwrap.dedent(f"""
        from rl_service.rewards.custom import CustomRewardRunner, CustomRewardSpec
        for function, answer in (("read_log", "SECRET-IN-LOG"), ("flood", "")):
            runner = CustomRewardRunner(CustomRewardSpec({spec.path!r}, function, 10.0, 256))
            print(function, runner.score(["x"], [answer]))
            runner.close()
    """)
    with open(log, "a") as stderr:   # as a Ray worker's stderr is its log file
        result = subprocess.run([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=stderr,
                                text=True, timeout=120)
    assert result.returncode == 0, log.read_text()[-2000:]
    counts = "{'custom_reward_errors': 0, 'custom_reward_timeouts': 0, 'custom_reward_restarts': 0}"
    assert f"read_log ([0.0], {counts})" in result.stdout and f"flood ([1.0], {counts})" in result.stdout, result.stdout
    text = log.read_text()
    assert text.startswith("SECRET-IN-LOG\n")
    # 4 MiB printed; 1 MiB of it reaches the log, then one line says the rest was dropped.
    assert 2**20 <= len(text) < 2**20 + 1000 and text.rstrip().endswith("bytes dropped]"), len(text)


def test_closing_a_runner_does_not_wait_for_a_process_that_escaped_with_its_stderr(escapes):
    # Sandbox off: a child out of the process group keeps the stderr pipe open; stop() waited on the
    # output thread's read for as long as that child lived (30 s, or for ever), after every timeout too.
    spec = escapes("escape_holding_stderr")
    script = textwrap.dedent(f"""
        from rl_service.rewards.custom import CustomRewardRunner, CustomRewardSpec
        runner = CustomRewardRunner(CustomRewardSpec({spec.path!r}, "escape_holding_stderr", 10.0, 256, "off"))
        print(runner.score(["x"], ["0"])[0])
        runner.close()
        print("closed")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=20)
    assert result.returncode == 0 and result.stdout.split() == ["[1.0]", "closed"], (result.stdout, result.stderr[-2000:])
