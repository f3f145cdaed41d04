"""The command line: user mistakes give one line naming the problem and exit code 2, no traceback."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def rl_service(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rl_service.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args, expected", [
    (["run", "configs/quickstart.yaml", "--set", "learner.lr=-1"], "learner.lr: Input should be greater than 0"),
    (["run", "configs/quickstart.yaml", "--set", "learner.learning_rate=1"], "learner.learning_rate: unknown key"),
    (["run", "configs/missing.yaml"], "configs/missing.yaml: config file not found"),
    (["run", "configs/quickstart.yaml", "--set", "model.path=/nonexistent"], "model.path: /nonexistent is not a directory"),
    (["run", "configs/jsonl_example.yaml", "--set", "data.train_path=/nonexistent.jsonl"], "/nonexistent.jsonl: dataset file not found"),
])
def test_user_errors_exit_2_with_one_line(args, expected):
    result = rl_service(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_bad_dataset_line_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?"}\n')
    result = rl_service("validate", "configs/jsonl_example.yaml", "--set", f"data.train_path={bad}")
    assert result.returncode == 2 and f"{bad}:2: missing field 'answer'" in result.stderr


def test_validate_and_schema():
    result = rl_service("validate", "configs/quickstart.yaml")
    assert result.returncode == 0, result.stderr
    assert "4096 train prompts, 256 eval prompts, verifier integer" in result.stdout
    schema = json.loads(rl_service("config-schema").stdout)
    assert {"model", "data", "generator", "reward", "statistics", "learner", "algorithm"} <= set(schema["properties"])


def test_validate_notes_what_a_local_run_here_would_be_refused_for():
    # The config is valid (exit 0, "ok"); the machine cannot run it: validate said only "ok", and run refused.
    result = rl_service("validate", "configs/quickstart.yaml", "--set", "learner.num_gpus=64")
    assert result.returncode == 0 and ": ok (" in result.stdout
    assert ("note: `rl-service run` here would be refused: local run: the roles ask for 64 GPU (learner: 64)"
            in result.stderr), result.stderr
    joined = rl_service("validate", "configs/quickstart.yaml", "--set", "learner.num_gpus=64",
                        "--set", "cluster.address=127.0.0.1:1")
    assert joined.returncode == 0 and "note:" not in joined.stderr   # a cluster's resources are not this machine's


def test_eval_of_the_builtin_model_reports_accuracy():
    result = rl_service("eval", "builtin", "--set", "data.arithmetic.num_eval=16")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["eval_prompts"] == 16 and 0.0 <= metrics["eval_accuracy"] <= 1.0


def test_a_reader_that_stops_early_gets_no_traceback():
    # `rl-service list | head -1` ended in "BrokenPipeError: [Errno 32] Broken pipe" and exit 1.
    process = subprocess.Popen([sys.executable, "-m", "rl_service.cli", "config-schema"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()   # the reader is gone before the schema is written (the CLI takes ~1 s to start)
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 128 + signal.SIGPIPE and "Traceback" not in stderr, stderr
    # Only stdout's reader going counts: another pipe's BrokenPipeError (an actor's) is a real error, raised.
    from rl_service.cli import _stdout_reader_gone

    assert not _stdout_reader_gone()
