"""Custom reward functions (`reward.custom`): the subprocess runner, the RewardActor and a real run.

Real subprocesses throughout; the failure corpus (raises, NaN, timeouts, memory, ...) one case at a
time is in tests/bad_inputs (test_bad_inputs.py). Here: behaviour across a batch and over time.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, read_metrics, short_run_overrides
from rl_service.errors import UserError
from rl_service.rewards.custom import (COUNTER_KEYS, CustomRewardRunner, CustomRewardSpec, check_custom_reward,
                                       custom_reward_spec, parse_custom_reward)

# Behaviour chosen by the completion text, so one batch mixes good and failing calls.
MIXED = '''
import math, os, random, resource, time

PROCESS_TOKEN = random.random()    # one per process: the same token means the same process

def reward(completion, answer):
    if completion == "boom":
        raise ValueError("boom at " + answer)
    if completion == "slow":
        time.sleep(30)
    if completion == "hog":
        return len(bytearray(4 * 2**30))
    if completion == "nan":
        return math.nan
    if completion == "huge":
        return 1e308
    if completion == "text":
        return "high"
    if completion == "pid":
        return PROCESS_TOKEN
    if completion == "limit":
        return resource.getrlimit(resource.RLIMIT_AS)[0] / 2**20
    return len(completion) + int(answer) / 10
'''


@pytest.fixture
def mixed(tmp_path) -> CustomRewardSpec:
    (tmp_path / "mixed.py").write_text(MIXED)
    return CustomRewardSpec(str(tmp_path / "mixed.py"), "reward", timeout_s=1.0, memory_mb=256)


def test_good_calls_run_in_one_limited_subprocess(mixed):
    runner = CustomRewardRunner(mixed)
    try:
        rewards, counts = runner.score(["ab", "abcd", "", "pid", "limit"], ["1", "2", "30", "0", "0"])
        again, _ = runner.score(["pid"], ["0"])
    finally:
        runner.close()
    assert rewards[:3] == [2.1, 4.2, 3.0]
    assert counts == {"custom_reward_errors": 0, "custom_reward_timeouts": 0, "custom_reward_restarts": 0}
    assert again == [rewards[3]] and runner.starts == 1  # one long-lived process
    assert rewards[4] == 256                         # under the address-space limit


def test_failures_score_0_are_counted_logged_once_per_kind_and_the_rest_still_scores(mixed, caplog):
    completions = ["boom", "ab", "boom", "slow", "abc", "hog", "nan", "text", "a", "slow"]
    runner = CustomRewardRunner(mixed)
    try:
        with caplog.at_level(logging.WARNING, logger="rl_service"):
            started = time.monotonic()
            rewards, counts = runner.score(completions, ["1"] * len(completions))
            seconds = time.monotonic() - started
            second, second_counts = runner.score(["boom", "ab"], ["1", "1"])
    finally:
        runner.close()
    assert rewards == [0.0, 2.1, 0.0, 0.0, 3.1, 0.0, 0.0, 0.0, 1.1, 0.0]
    # A process is started again when the next completion needs it: after "slow" and "hog" in this
    # call, after the last "slow" at the start of the next.
    assert counts == {"custom_reward_errors": 5, "custom_reward_timeouts": 2, "custom_reward_restarts": 2}
    assert second == [0.0, 2.1] and second_counts == {"custom_reward_errors": 1, "custom_reward_timeouts": 0,
                                                      "custom_reward_restarts": 1}
    assert runner.totals == {"custom_reward_errors": 6, "custom_reward_timeouts": 2, "custom_reward_restarts": 3}
    # The timeout counters above are the check that both slow calls were cut; this adds that neither
    # ran its 30 s sleep out before being counted. (A bound of 2 s of limits + 5 s was a timing
    # assertion: 4 process starts and 10 calls went past it on a loaded machine.)
    assert seconds < 30
    # Timeouts and the memory blow-up restart the process: first start + slow + hog + slow.
    assert runner.starts == 4
    warnings = [record.getMessage() for record in caplog.records if record.name == "rl_service"]
    assert len(warnings) == 4, warnings              # raised, timeout, memory, returned (nan, then "high": one kind)
    assert any("raised ValueError: boom at 1" in message for message in warnings)
    assert any("took more than 1 s" in message and "custom_reward_timeouts" in message for message in warnings)
    assert any("ran out of memory (reward.custom_memory_mb=256)" in message for message in warnings)
    assert any("returned nan, not a finite number" in message for message in warnings)


def test_a_module_that_stops_importing_fails_the_batch_once_not_per_completion(tmp_path):
    (tmp_path / "state").mkdir()
    flag = tmp_path / "state" / "broken"
    (tmp_path / "flaky.py").write_text(f"import pathlib\nif pathlib.Path({str(flag)!r}).exists():\n"
                                       "    raise RuntimeError('config moved')\n\ndef reward(c, a):\n    return 1\n")
    # The flag's folder is listed in reward.custom_readable: the sandbox shows nothing else of tmp_path.
    runner = CustomRewardRunner(CustomRewardSpec(str(tmp_path / "flaky.py"), "reward", 1.0, 256,
                                                 readable=(str(tmp_path / "state"),)))
    try:
        assert runner.score(["x"], ["1"]) == ([1.0], {"custom_reward_errors": 0, "custom_reward_timeouts": 0,
                                                    "custom_reward_restarts": 0})
        flag.touch()
        runner._stop_worker()   # as if the process had died: the next call imports the module again
        rewards, counts = runner.score(["x", "y", "z"], ["1"] * 3)
        flag.unlink()
        recovered, _ = runner.score(["x"], ["1"])
    finally:
        runner.close()
    assert rewards == [0.0] * 3 and counts["custom_reward_errors"] == 3
    assert recovered == [1.0] and runner.starts == 3


@pytest.mark.parametrize("sandbox", ["auto", "off"])
def test_close_and_a_dead_parent_both_end_the_subprocess(mixed, sandbox):
    spec = CustomRewardSpec(mixed.path, "reward", 1.0, 256, sandbox)
    runner = CustomRewardRunner(spec)
    runner.score(["pid"], ["0"])
    assert reward_processes(mixed.path)
    runner.close()
    assert _all_gone(mixed.path, within_s=2)
    # A parent killed with SIGKILL cannot clean up, even while a call is stuck in user code (a 30 s
    # sleep under a 60 s limit here): the subprocess notices it is orphaned and exits by itself.
    parent = subprocess.Popen(
        [sys.executable, "-c", "from rl_service.rewards.custom import *\n"
         f"r = CustomRewardRunner(CustomRewardSpec({mixed.path!r}, 'reward', 60.0, 256, {sandbox!r}))\n"
         "print(r.score(['pid'], ['0'])[0][0], flush=True)\nr.score(['slow'], ['0'])"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        parent.stdout.readline()
        time.sleep(0.3)  # the slow call has started
        assert reward_processes(mixed.path)
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    assert _all_gone(mixed.path, within_s=5)


def reward_processes(path: str) -> list[int]:
    """Live (not zombie) processes running the reward file `path`: the sandbox, the reward process
    and anything it forked (a fork keeps its parent's command line)."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        if process.info["status"] != psutil.STATUS_ZOMBIE and path in (process.info["cmdline"] or []):
            found.append(process.info["pid"])
    return found


def _all_gone(path: str, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while reward_processes(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while True:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().split(") ", 1)[1].startswith("Z"):
                    return True      # exited, waiting to be reaped by its (dead) parent's reaper
        except FileNotFoundError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def test_a_decorated_function_is_checked_by_how_it_is_called_not_what_it_wraps(tmp_path):
    # inspect.signature follows __wrapped__: an adapter of f(completion) into (completion, answer)
    # was refused as f(completion).
    (tmp_path / "wrapped.py").write_text(
        "import functools\n\n"
        "def two_arguments(score):\n"
        "    @functools.wraps(score)\n"
        "    def adapter(completion, answer):\n"
        "        return score(completion)\n"
        "    return adapter\n\n"
        "@two_arguments\n"
        "def reward(completion):\n"
        "    return 1.0\n")
    spec = CustomRewardSpec(str(tmp_path / "wrapped.py"), "reward", 5.0, 256, "off")
    check_custom_reward(spec)
    runner = CustomRewardRunner(spec)
    try:
        assert runner.score(["x"], ["0"])[0] == [1.0]
    finally:
        runner.close()


def test_spec_parsing_and_config_fields(tmp_path, monkeypatch):
    from rl_service.config import load_config

    monkeypatch.chdir(tmp_path)
    spec = parse_custom_reward("rewards/mine.py:score", 2.5, 300)
    assert spec == CustomRewardSpec(str(tmp_path / "rewards" / "mine.py"), "score", 2.5, 300)
    config = load_config(REPO / "configs" / "custom_reward_example.yaml")
    assert (config.reward.custom, config.reward.custom_timeout_s, config.reward.custom_memory_mb) == (
        "configs/rewards/format_bonus.py:reward", 2.0, 512)
    assert custom_reward_spec(load_config(None).reward) is None
    for bad in ("mine.py", "mine.py:", ":score", "mine.py:not-a-name", "mine.txt:score"):
        with pytest.raises(UserError, match="^reward.custom: "):
            parse_custom_reward(bad)


def test_shipped_example_validates_and_scores_as_documented(capsys, monkeypatch):
    from rl_service.cli import main

    monkeypatch.chdir(REPO)
    assert main(["validate", "configs/custom_reward_example.yaml"]) == 0
    assert "train prompts" in capsys.readouterr().out
    spec = parse_custom_reward("configs/rewards/format_bonus.py:reward")
    check_custom_reward(spec)
    runner = CustomRewardRunner(spec)
    try:
        rewards, counts = runner.score(["<think>2+3=5</think>\n\n5", "<think>2+3=6</think>\n\n6", "<think>hmm</think> six",
                                        "5", "<think>1,000+1=1,001</think> 1,001"], ["5", "5", "6", "5", "1001"])
    finally:
        runner.close()
    assert rewards == [1.0, 0.1, 0.0, 0.0, 1.0]
    assert counts == dict.fromkeys(COUNTER_KEYS, 0)


# -- through Ray -----------------------------------------------------------------------------------

def test_reward_actor_uses_the_function_returns_counters_and_keeps_the_verifier_for_eval(mixed):
    import ray

    from actors.reward import RewardActor
    from rl_service.rollout import Rollout

    texts = ["<think>1+1=2</think> 2", "boom", "slow", "<think>x</think> 3", "huge"]
    rollout = Rollout(request_index=[0, 0, 1, 1, 1], prompt_token_ids=[[1]] * 5, completion_token_ids=[[5]] * 5,
                      behaviour_logprobs=[None] * 5, completion_texts=texts, finished=[True] * 5,
                      weight_versions=[0] * 5)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR")
    try:
        actor = RewardActor.remote("integer", 5.0, custom=mixed, clip=(-100.0, 100.0))
        shard = ray.put(rollout)
        scored = ray.get(actor.score.remote([shard], ["2", "3"]))
        verified = ray.get(actor.score.remote([shard], ["2", "3"], verifier_only=True))
        plain = ray.get(RewardActor.remote("integer", 5.0).score.remote([shard], ["2", "3"]))
    finally:
        ray.shutdown()
    # 1e308 from the function is clipped to reward.clip's 100 and counted (issue #19: it made reward_mean null).
    assert scored["rewards"] == [len(texts[0]) + 0.2, 0.0, 0.0, len(texts[3]) + 0.3, 100.0]
    assert (scored["custom_reward_errors"], scored["custom_reward_timeouts"], scored["rewards_clipped"]) == (1, 1, 1)
    assert verified["rewards"] == [1.0, 0.0, 0.0, 1.0, 0.0] and verified["custom_reward_errors"] == 0
    assert verified["rewards_clipped"] == 0
    # The timed-out process was replaced once: the restart reaches the step's metrics with the failures.
    assert scored["custom_reward_restarts"] == 1 and verified["custom_reward_restarts"] == 0
    assert plain["rewards"] == [1.0, 0.0, 0.0, 1.0, 0.0] and plain["custom_reward_timeouts"] == 0


@pytest.mark.slow
def test_a_short_training_run_is_rewarded_by_the_custom_function(tmp_path):
    """The whole path: config → check before Ray → RewardActor → subprocess → the step's rewards."""
    from rl_service.config import load_config
    from rl_service.driver import prepare_job, run_training

    calls = tmp_path / "calls.jsonl"
    (tmp_path / "half.py").write_text(
        "import json, os\n\n\ndef reward(completion, answer):\n"
        f"    with open({str(calls)!r}, 'a') as log:\n"
        "        log.write(json.dumps({'pid': os.getpid(), 'answer': answer}) + '\\n')\n"
        "    return 0.5\n")
    config = load_config(REPO / "configs" / "custom_reward_example.yaml", short_run_overrides(steps=2) + [
        "generator.backend=hf", f"reward.custom={tmp_path / 'half.py'}:reward", "checkpoint.every=0",
        "reward.custom_sandbox=off"])   # the function logs its calls to a host file, which the sandbox forbids
    summary = run_training(prepare_job(config), tmp_path / "run")

    assert summary["steps"] == 2
    train_rows = [row for row in read_metrics(tmp_path / "run") if "loss" in row]
    assert [row["reward_mean"] for row in train_rows] == [0.5, 0.5]
    assert [(row["custom_reward_errors"], row["custom_reward_timeouts"]) for row in train_rows] == [(0.0, 0.0)] * 2
    records = [json.loads(line) for line in calls.read_text().splitlines()]
    # Every training completion went through the function, and no eval completion: eval keeps the verifier.
    assert len(records) == 2 * 4 * 4
    assert len({record["pid"] for record in records}) == 1 and records[0]["pid"] != os.getpid()
    assert all(record["answer"].lstrip("-").isdigit() for record in records)
    assert _gone(records[0]["pid"], within_s=5)       # stopped with its RewardActor
