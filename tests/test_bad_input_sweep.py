"""Bad inputs found by the 2026-12-07 user's-eye sweep: each passed `validate` (or was misreported)
and then failed after Ray started, with a traceback. Each must now be one line, exit code 2, naming
the field, before Ray starts. The CLI runs in this process, as in tests/test_bad_inputs.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from rl_service.cli import EXIT_USER_ERROR, main

REPO = Path(__file__).resolve().parents[1]
BASE = "tests/bad_inputs/configs/base.yaml"


def _one_line_error(args: list[str], capsys, monkeypatch) -> str:
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("RL_SERVICE_SUBMISSION_ID", "bad-input-sweep")
    code = main(args)
    out, err = capsys.readouterr()
    assert code == EXIT_USER_ERROR, f"exit {code}; stdout: {out!r}; stderr: {err!r}"
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rl-service: error: "), lines[0]
    return lines[0]


# Ray refuses these in .options() once the roles start (ValueError, rc 1, a traceback, and a run
# directory left behind); validate passed them.
@pytest.mark.parametrize("override, expect", [
    ("generator.resources={gpu: -1}", "generator.resources: 'gpu': -1 is negative"),
    ("reward.resources={CPU: 1}", "reward.resources: 'CPU' is not a custom resource: set num_cpus beside resources"),
    ("learner.resources={GPU: 1}", "learner.resources: 'GPU' is not a custom resource: set num_gpus beside resources"),
    ("statistics.resources={tiny: 0.00001}", "statistics.resources: 'tiny': 1e-05 is finer than"),
    ("generator.num_cpus=0.00001", "generator.num_cpus: 1e-05 is finer than"),
    ("learner.num_gpus=0.00005", "learner.num_gpus: 5e-05 is finer than"),
])
def test_ray_resource_amounts_ray_refuses_are_refused_by_validate(override, expect, capsys, monkeypatch):
    line = _one_line_error(["validate", BASE, "--set", override], capsys, monkeypatch)
    assert expect in line, line


# The built-in task's generator refused these sizes with a bare ValueError: a traceback from validate
# (and from run, before Ray); the config's own ranges let them through.
@pytest.mark.parametrize("overrides, expect", [
    (["data.arithmetic.num_train=1000000"], "data.arithmetic: num_train must be < 1000000"),
    (["data.arithmetic.num_eval=100000", "data.arithmetic.num_train=1"],
     "data.arithmetic: num_eval=100000 needs 20000 distinct level-1 questions, but level 1 has only 200"),
    (["data.arithmetic.levels=[1]", "data.arithmetic.num_eval=200"],
     "data.arithmetic: num_eval=200 uses every level-1 question; none left for num_train"),
])
def test_arithmetic_split_sizes_the_generator_cannot_make_are_config_errors(overrides, expect, capsys, monkeypatch):
    args = ["validate", BASE] + [part for override in overrides for part in ("--set", override)]
    line = _one_line_error(args, capsys, monkeypatch)
    assert expect in line, line


def _unreadable(monkeypatch, path: Path) -> None:
    """`path` cannot be read, as a chmod 000 file is to a user who is not root (these tests may run as
    root, who reads it anyway)."""
    read_bytes = Path.read_bytes

    def refuse(self):
        if Path(self).resolve() == path.resolve():
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)


# A PermissionError traceback (rc 1) from validate and run, before the fix.
@pytest.mark.parametrize("kind", ["config", "prompts.jsonl", "prompts.csv", "preferences.jsonl"])
def test_an_unreadable_input_file_is_named_in_one_line(kind, tmp_path, capsys, monkeypatch):
    config = tmp_path / "job.yaml"
    config.write_text((REPO / "tests/bad_inputs/configs/base_jsonl.yaml").read_text())
    data = tmp_path / kind
    args = ["validate", str(config), "--set", "data.prompts_per_step=1"]
    if kind == "preferences.jsonl":
        data.write_text("")
        args = ["validate", "configs/bvpo_offline.yaml", "--set", f"preference.dataset_path={data}"]
    elif kind != "config":
        data.write_text('{"prompt": "1+1?", "answer": "2"}\n' if kind.endswith("jsonl") else "prompt,answer\n1+1?,2\n")
        args += ["--set", f"data.train_path={data}"]
    target = config if kind == "config" else data
    _unreadable(monkeypatch, target)
    line = _one_line_error(args, capsys, monkeypatch)
    assert f"{target}: cannot read (Permission denied)" in line, line
