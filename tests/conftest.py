"""Shared fixtures: a short real run (real Ray, real DeepSpeed, the shipped tiny model) reused by tests."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Every Ray the tests start, here and in the CLI runs they spawn (which inherit it), keeps its
# sessions in a directory of its own, not in the /tmp/ray that other runs on the host share.
# Short, under /tmp: Ray's socket paths have a length limit.
if "RAY_TMPDIR" not in os.environ:
    import atexit

    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rlt", dir="/tmp")
    atexit.register(shutil.rmtree, os.environ["RAY_TMPDIR"], ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def short_run_overrides(steps: int = 3) -> list[str]:
    """A quickstart small enough for CI: few steps, few prompts, a small eval split."""
    return [f"steps={steps}", "eval_every=2", "data.prompts_per_step=4", "generator.samples_per_prompt=4",
            "data.arithmetic.num_train=64", "data.arithmetic.num_eval=16", "generator.max_new_tokens=48",
            "logging.progress_bar=false", "checkpoint.every=2",
            "schedule.mode=sync",  # the sync loop's exact invariants; tests/test_e2e_async.py covers async
            "guard.max_eval_drop=null"]  # 16 eval prompts: one prompt is 6 points of noise


def run_short_job(run_dir: Path, extra: list[str] | None = None, steps: int = 3) -> dict:
    from rl_service.config import load_config
    from rl_service.driver import prepare_job, run_training

    config = load_config(REPO / "configs" / "quickstart.yaml", short_run_overrides(steps) + list(extra or []))
    return run_training(prepare_job(config), run_dir)


# Metrics that measure time, by name: the only ones a replayed, resumed or recovered run may differ
# in. Every other metric (accepted, truncated, non-finite, clip and padding fractions included) must
# equal the reference's.
TIMING_METRICS = frozenset({
    "completions_per_s", "tokens_per_s", "step_seconds", "train_seconds", "eval_seconds", "weight_sync_seconds",
    "driver_overhead_fraction", "time_generate_s", "time_reward_s", "time_statistics_s", "time_train_s",
    "time_publish_s", "time_scale_s", "time_driver_s", "eval_sampled_seconds"})
# Fractions an earlier comparison skipped (any name containing "fraction"): compared now, checked present.
FRACTIONS = {"accepted_fraction", "truncated_fraction", "nonfinite_update_fraction", "clip_frac_low", "clip_frac_high",
             "padding_fraction", "zero_variance_sample_fraction", "stale_sample_fraction"}


def comparable_metrics(rows: list[dict]) -> list[dict]:
    """Each row without its timing metrics; fails on a metric that looks like a timing but is not
    named above, so a new one is either added there or compared, never skipped by a pattern."""
    for row in rows:
        unnamed = {key for key in row if key.endswith(("_s", "seconds")) and key not in TIMING_METRICS}
        assert not unnamed, f"timing-like metrics not in TIMING_METRICS: {sorted(unnamed)}"
    return [{key: value for key, value in row.items() if key not in TIMING_METRICS} for row in rows]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def short_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("short_run")
    summary = run_short_job(run_dir)
    return run_dir, summary


def arithmetic_requests(count: int, samples: int, seed: int, levels=(1, 2, 3)) -> list:
    """Generation requests for `count` prompts of the built-in task, `samples` completions each."""
    from rl_service.data.arithmetic import make_arithmetic_split
    from rl_service.data.prompts import PromptRecord
    from rl_service.models.loading import load_tokenizer
    from rl_service.rollout import GenerationRequest
    from rl_service.tasks import PromptTokenizer

    train, _ = make_arithmetic_split(seed=seed, num_train=count, num_eval=1, levels=list(levels))
    tokenize = PromptTokenizer(load_tokenizer("builtin", False), thinking=True)
    return [GenerationRequest(k, p.prompt_id, tokenize(PromptRecord(p.prompt_id, p.question, p.answer)), samples)
            for k, p in enumerate(train)]


@pytest.fixture(scope="module")
def ray_session():
    """Ray on 127.0.0.1 for one test module, with the actors' environment (DS_ACCELERATOR, ...)."""
    from rl_service.driver.roles import loopback_local_ray

    loopback_local_ray()   # an earlier module imported Ray already: the environment alone came too late
    import ray

    from actors.process import ACTOR_ENV

    ray.init(address="local", num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR",
             runtime_env={"env_vars": dict(ACTOR_ENV)})
    yield ray
    ray.shutdown()


def assert_engines_match_the_learner(ray, pool, learner_group, version: int, atol: float = 1e-4) -> None:
    """The pool's engines sample with weights `version`, and each sampled token's log-prob is the
    learner's own to `atol` (the weights arrived whole)."""
    import numpy as np

    from rl_service.rollout import SamplingParams

    shard_refs = ray.get(pool.generate.remote(arithmetic_requests(4, 2, seed=2), SamplingParams(max_new_tokens=16),
                                              9, True))
    shards = ray.get(shard_refs)
    assert {weights for shard in shards for weights in shard.weight_versions} == {version}
    learner_logprobs = ray.get(learner_group.completion_logprobs.remote(shard_refs))
    behaviour = [row for shard in shards for row in shard.behaviour_logprobs]
    assert len(learner_logprobs) == len(behaviour) == 8
    for learner_row, engine_row in zip(learner_logprobs, behaviour):
        np.testing.assert_allclose(np.asarray(engine_row), np.asarray(learner_row), atol=atol)


# A real token-auth Ray head with its dashboard, and our CLI against it (tests/test_cluster_jobs.py,
# tests/test_dashboard_browser.py; module-scoped: each test module gets its own head).

def _free_port() -> int:
    from rl_service.training.engine import free_port

    return free_port()


@contextmanager
def unreachable_url():
    """`http://127.0.0.1:PORT` where nothing listens, for as long as the block runs. The port stays
    bound (never listening), so a connect is refused and no other process can take it between pick
    and use: a free port picked and released was once taken by a Ray head's own worker, and the
    "dead" address answered with an auth error."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{blocker.getsockname()[1]}"


@pytest.fixture(scope="module")
def head():
    """(job server URL, environment of an authenticated client) of a fresh token-auth head."""
    with start_head() as started:
        yield started


class _HeadExited(RuntimeError):
    pass


@contextmanager
def start_head(extra_args: tuple[str, ...] = (), env_changes: dict[str, str | None] | None = None,
               attempts: int = 3):
    """A token-auth `ray start --head --block` with temp dir <scratch>/ray, torn down by its process group
    (never `ray stop`, which stops every Ray of the user on the host); `extra_args` go to `ray start`,
    `env_changes` to its environment (None: unset). A head that exits while starting is retried on
    fresh ports in an emptied temp dir: on a shared machine a port picked free can be taken before Ray
    binds it (one clean-clone CI run lost three tests to that). Its output is kept (in <scratch>, beside
    the temp dir), so a head that never starts says why."""
    scratch = Path(tempfile.mkdtemp(prefix="rlsj", dir="/tmp"))   # short: Ray's socket paths have a length limit
    token_file = scratch / "token"
    token_file.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    for name, value in (env_changes or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    process = None
    try:
        for attempt in range(1, attempts + 1):
            dashboard_port = _free_port()
            log_path = scratch / f"ray-start-{attempt}.log"
            with open(log_path, "wb") as log:
                process = subprocess.Popen(
                    [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                     f"--port={_free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                     "--include-dashboard=true", f"--temp-dir={scratch / 'ray'}", "--num-cpus=4",
                     "--disable-usage-stats",
                     # Fixed defaults (the agent's 52365, the client server's 10001) collide with any other
                     # head on this machine, whose agent would then never come up here: free ports for all.
                     *[f"--{name}={_free_port()}" for name in ("dashboard-agent-listen-port",
                                                              "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                                              "ray-client-server-port")
                       if not any(arg.startswith(f"--{name}=") for arg in extra_args)],
                     *extra_args],
                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            address = f"http://127.0.0.1:{dashboard_port}"
            try:
                _wait_for(address, token_file.read_text(), process)
                # The dashboard answers before `ray start` has written its address file (ray_current_cluster),
                # which the tests of a local run beside this head rely on: wait for that too.
                deadline = time.monotonic() + 120
                while not (scratch / "ray" / "ray_current_cluster").is_file() and time.monotonic() < deadline:
                    if process.poll() is not None:
                        raise _HeadExited(f"ray start --head exited with {process.returncode}")
                    time.sleep(0.2)
                break
            except _HeadExited as exited:
                _stop_group(process)
                process = None
                # Tests read the head's files under <scratch>/ray (its RAY_TMPDIR): a retry starts there afresh.
                shutil.rmtree(scratch / "ray", ignore_errors=True)
                if attempt == attempts:
                    tail = log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{exited} on each of {attempts} tries; its last output:\n{tail}") from None
        client_env = {key: value for key, value in env.items() if key != "RAY_AUTH_TOKEN_PATH"}
        yield address, client_env, token_file
    finally:
        if process is not None:
            _stop_group(process)
        shutil.rmtree(scratch, ignore_errors=True)


def _stop_group(process) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:   # the group is already gone
        return
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def _wait_for(address: str, token: str, process, timeout_s: float = 300.0) -> None:
    # 300 s: on a shared 2-core machine under a load of 20+ a head's dashboard took over 120 s.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise _HeadExited(f"ray start --head exited with {process.returncode}")
        request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the head's job server at {address} did not come up in {timeout_s:g} s")


def cli(args: list[str], env: dict, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rl_service.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _wait_status(job_id: str, address: str, env: dict, wanted: set[str], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    status = "?"
    while time.monotonic() < deadline:
        result = cli(["status", job_id, "--address", address], env)
        assert result.returncode == 0, result.stderr
        status = result.stdout.strip().splitlines()[0]   # a failed job's Ray message follows on later lines
        if status in wanted:
            return status
        time.sleep(2)
    raise AssertionError(f"job {job_id} still {status} after {timeout_s:g} s")


SHORT_JOB = ["--set", "steps=2", "--set", "eval_every=0", "--set", "data.prompts_per_step=2",
             "--set", "generator.samples_per_prompt=2", "--set", "data.arithmetic.num_eval=4",
             "--set", "generator.backend=hf", "--set", "generator.max_new_tokens=16", "--set", "schedule.mode=sync",
             "--set", "logging.progress_bar=false", "--set", "checkpoint.every=0"]


# -- the end of the session -----------------------------------------------------------------------
# After every test had passed, one CI run of the cluster suite died with SIGSEGV while the
# interpreter tore itself down (stop 24: "13 passed", then "Segmentation fault"; two reruns here with
# faulthandler on exited cleanly). That suite connects this process to a dozen Ray sessions in turn,
# and Ray's core worker leaves native threads that may outlive `ray.shutdown()` and touch freed
# state at exit (ray-project/ray#31145). Nothing of the suite's result is decided at that point, so
# the session ends the way Ray's own workers do: shut Ray down, flush, and exit with pytest's status
# without the interpreter's teardown. Threads still alive are named first, for whoever digs further.
_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    import threading

    if not _EXIT_STATUS:   # pytest stopped before a session ran (a usage error): let it exit its own way
        return
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    leftover = [thread.name for thread in threading.enumerate() if thread is not threading.main_thread()]
    if leftover and os.environ.get("RL_SERVICE_TEST_THREADS"):
        print(f"threads alive at exit: {leftover}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[-1])


# A whole safetensors file holding no tensors (8-byte header length, then `{}` padded to 8 bytes): the
# resume checks read every checkpoint's safetensors headers (run_dir.checkpoint_problem).
EMPTY_SAFETENSORS = (8).to_bytes(8, "little") + b"{}      "


def fake_checkpoint(run_dir: Path, step: int, adapter: bool = False, latest: bool = True) -> Path:
    """A complete-looking checkpoint `run_dir/checkpoints/step_N` (every file a resume checks for, not
    loadable weights), named by `checkpoints/latest` unless `latest` is False: for the checks made
    before Ray starts."""
    from rl_service.driver.run_dir import CHECKPOINT_FILES

    checkpoint = Path(run_dir) / "checkpoints" / f"step_{step}"
    weights = checkpoint / ("adapter" if adapter else "model")
    weights.mkdir(parents=True)
    for name in (("adapter_config.json", "adapter_model.safetensors") if adapter
                 else ("config.json", "model.safetensors")):
        (weights / name).write_bytes(EMPTY_SAFETENSORS if name.endswith(".safetensors") else b"")
    for name in CHECKPOINT_FILES:
        (checkpoint / name).write_bytes(json.dumps({"step": step}).encode() if name == "trainer_state.json"
                                        else EMPTY_SAFETENSORS if name.endswith(".safetensors") else b"")
    if latest:
        (checkpoint.parent / "latest").write_text(checkpoint.name)
    return checkpoint


def one_line_cli_error(args: list, capsys, monkeypatch) -> str:
    """The CLI's one error line for `args`, run in this process from the repository (the cases' paths
    are relative to it, like a user's), asserting exit code 2, one line and no traceback."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("RL_SERVICE_SUBMISSION_ID", "bad-inputs-corpus")   # `run` would set one for this process
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        # The job commands clear or set these; setenv first so that monkeypatch restores them afterwards.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    from rl_service.cli import EXIT_USER_ERROR, main

    code = main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    assert code == EXIT_USER_ERROR, f"exit {code}; stdout: {out!r}; stderr: {err!r}"
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rl-service: error: "), lines[0]
    return lines[0]
