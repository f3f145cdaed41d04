"""The bad-input corpus (tests/bad_inputs/cases.yaml): every user mistake in a config, dataset, model
directory or custom reward function ends in one clear line and exit code 2 before Ray starts, and
a reward function that fails while scoring costs that completion its reward, counted, not the run.

The CLI runs in this process (`rl_service.cli.main`) so the corpus takes seconds, not minutes;
tests/test_cli.py runs the real `python -m rl_service.cli` subprocess for a few of the same errors.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from conftest import one_line_cli_error
from rl_service.rewards.custom import COUNTER_KEYS, CustomRewardRunner, parse_custom_reward

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).resolve().parent / "bad_inputs"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text(encoding="utf-8"))


def _ids(cases: list[dict]) -> list[str]:
    return [case["name"] for case in cases]


def test_corpus_is_large_named_uniquely_and_has_no_stray_files():
    cases = CASES["cli"] + CASES["reward_runtime"]
    assert len(cases) >= 30
    names = _ids(cases)
    assert len(names) == len(set(names))
    # A file no case mentions is an untested input: every one must appear in some case's arguments.
    mentioned = " ".join(" ".join(map(str, case.get("args", []))) + " " + case.get("custom", "") for case in cases)
    for folder in ("data", "models", "rewards", "configs"):
        for entry in sorted((CORPUS / folder).iterdir()):
            assert f"{folder}/{entry.name}" in mentioned, f"tests/bad_inputs/{folder}/{entry.name} is in no case"


@pytest.mark.parametrize("case", CASES["cli"], ids=_ids(CASES["cli"]))
def test_cli_reports_one_line_and_exits_2(case, capsys, monkeypatch):
    line = one_line_cli_error(case["args"], capsys, monkeypatch)
    assert case["expect"] in line, line


@pytest.mark.parametrize("case", CASES["reward_runtime"], ids=_ids(CASES["reward_runtime"]))
def test_failing_reward_function_scores_0_and_is_counted(case, caplog):
    spec = parse_custom_reward(str(REPO / case["custom"]), case.get("timeout_s", 2.0), case.get("memory_mb", 512))
    runner = CustomRewardRunner(spec)
    try:
        with caplog.at_level(logging.WARNING, logger="rl_service"):
            rewards, counts = runner.score(["<think>1 + 1 = 2</think>\n\n2"], ["2"])
    finally:
        runner.close()
    assert rewards == [case.get("score", 0.0)]
    assert counts == {"custom_reward_errors": case.get("errors", 0), "custom_reward_timeouts": case.get("timeouts", 0),
                      "custom_reward_restarts": 0}   # one completion: a replacement process starts with the next
    assert set(counts) == set(COUNTER_KEYS)
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    if "log" in case:
        assert len(warnings) == 1 and case["log"] in warnings[0], warnings
    else:
        assert warnings == []
