"""Bad inputs found by the 2026-12-07 user's-eye sweep: each passed `validate` (or was misreported)
and then failed after Ray started, with a traceback. Each must now be one line, exit code 2, naming
the field, before Ray starts. The CLI runs in this process, as in tests/test_bad_inputs.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from rl_service.cli import EXIT_USER_ERROR, main
from conftest import one_line_cli_error

REPO = Path(__file__).resolve().parents[1]
BASE = "tests/bad_inputs/configs/base.yaml"


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
    line = one_line_cli_error(["validate", BASE, "--set", override], capsys, monkeypatch)
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
    line = one_line_cli_error(args, capsys, monkeypatch)
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
    line = one_line_cli_error(args, capsys, monkeypatch)
    assert f"{target}: cannot read (Permission denied)" in line, line


def _untraversable(monkeypatch, directory: Path) -> None:
    """Nothing under `directory` can be looked at, as under a chmod 000 directory for a user who is not
    root: stat (and so exists, is_file, is_dir) and open raise PermissionError."""
    stat, open_ = Path.stat, Path.open

    def under(path) -> bool:
        return directory in Path(path).absolute().parents

    def refuse_stat(self, *args, **kwargs):
        if under(self):
            raise PermissionError(13, "Permission denied", str(self))
        return stat(self, *args, **kwargs)

    def refuse_open(self, *args, **kwargs):
        if under(self) or Path(self).absolute() == directory:
            raise PermissionError(13, "Permission denied", str(self))
        return open_(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", refuse_stat)
    monkeypatch.setattr(Path, "open", refuse_open)


def test_a_data_file_in_a_directory_that_cannot_be_entered_is_named(tmp_path, capsys, monkeypatch):
    (tmp_path / "locked").mkdir()
    data = tmp_path / "locked" / "train.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    _untraversable(monkeypatch, tmp_path / "locked")
    line = one_line_cli_error(["validate", "tests/bad_inputs/configs/base_jsonl.yaml", "--set", "data.prompts_per_step=1",
                            "--set", f"data.train_path={data}"], capsys, monkeypatch)
    assert f"{data}: cannot read (Permission denied)" in line, line


def test_a_run_dir_in_a_directory_that_cannot_be_entered_is_refused_before_ray(tmp_path, capsys, monkeypatch):
    (tmp_path / "locked").mkdir()
    _untraversable(monkeypatch, tmp_path / "locked")
    line = one_line_cli_error(["run", BASE, "--run-dir", str(tmp_path / "locked" / "run")], capsys, monkeypatch)
    assert f"--run-dir {tmp_path / 'locked' / 'run'}: cannot look there (Permission denied)" in line, line


def test_an_unreadable_file_of_a_local_hf_dataset_is_named(tmp_path, capsys, monkeypatch):
    import builtins
    import io
    import shutil

    dataset = tmp_path / "hf"
    shutil.copytree(REPO / "tests/bad_inputs/data/hf_questions", dataset)
    locked, real_open = dataset / "test.jsonl", io.open

    def refuse(file, *args, **kwargs):   # `datasets` opens with open(), our code with Path.open (io.open)
        if isinstance(file, (str, Path)) and Path(file).absolute() == locked:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(io, "open", refuse)
    line = one_line_cli_error(["validate", "tests/bad_inputs/configs/base_hf.yaml", "--set", f"data.hf.path={dataset}"],
                           capsys, monkeypatch)
    assert f"{locked}: cannot read (Permission denied)" in line, line


@pytest.mark.parametrize("kind", ["config", "hf", "reward", "preferences"])
def test_other_inputs_in_a_directory_that_cannot_be_entered_are_named(kind, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    target = locked / {"config": "job.yaml", "hf": "hf", "reward": "r.py", "preferences": "p.jsonl"}[kind]
    args = {"config": ["validate", str(target)],
            "hf": ["validate", "tests/bad_inputs/configs/base_hf.yaml", "--set", f"data.hf.path={target}"],
            "reward": ["validate", BASE, "--set", f"reward.custom={target}:reward", "--set", "reward.custom_sandbox=off"],
            "preferences": ["validate", "configs/bvpo_offline.yaml", "--set", f"preference.dataset_path={target}"]}[kind]
    _untraversable(monkeypatch, locked)
    line = one_line_cli_error(args, capsys, monkeypatch)
    assert f"{target}: cannot read (Permission denied)" in line, line


def test_an_empty_run_dir_is_refused_not_read_as_the_default(tmp_path, capsys, monkeypatch):
    """`--run-dir ""` (an unset shell variable) trained a whole run in runs/<job id>, starting Ray."""
    import rl_service.cli as cli

    def would_run(*_args):
        raise AssertionError("the run went ahead")

    monkeypatch.setattr(cli, "_run_in", would_run)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RL_SERVICE_SUBMISSION_ID", "bad-input-sweep")
    assert main(["run", str(REPO / BASE), "--run-dir", ""]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.splitlines() == ["rl-service: error: --run-dir is empty: name the run directory, or leave --run-dir "
                                "out for <logging.output_dir>/<run id>"], err
    assert list(tmp_path.iterdir()) == []   # no runs/ made


def test_submit_with_an_empty_run_dir_is_refused_before_any_request(capsys, monkeypatch):
    # It fell back to <output_dir>/<job id> on the cluster, as run did.
    from conftest import unreachable_url

    with unreachable_url() as nowhere:
        line = one_line_cli_error(["submit", BASE, "--run-dir", "", "--address", nowhere], capsys, monkeypatch)
    assert line == "rl-service: error: --run-dir is empty: name the run directory, or leave --run-dir out for " \
                   "<logging.output_dir>/<run id>", line


@pytest.mark.parametrize("args, expect", [
    (["validate", ""], "rl-service: error: the config path is empty: name a YAML job file (e.g. configs/quickstart.yaml)"),
    (["resume", ""], "rl-service: error: the run directory is empty: name a run directory or a job id"),
])
def test_an_empty_path_argument_is_named_as_empty(args, expect, capsys, monkeypatch):
    # Read as "." before: ": is a directory, not a config file", ".: not a run directory".
    line = one_line_cli_error(args, capsys, monkeypatch)
    assert line == expect, line


@pytest.mark.parametrize("override, expect", [
    # Read as level 1 (pydantic's lax int), as `steps: true` is refused for.
    ("data.arithmetic.levels=[true, 2]", "data.arithmetic.levels: expected level numbers, got true"),
    # Passed validate; `run` then refused it as "not a Ray address", and `submit` sent it to the cluster.
    ("cluster.address=10.0.0.1:99999", "cluster.address: '10.0.0.1:99999' is not a Ray address"),
])
def test_values_validate_let_through(override, expect, capsys, monkeypatch):
    line = one_line_cli_error(["validate", BASE, "--set", override], capsys, monkeypatch)
    assert expect in line, line


@pytest.mark.parametrize("unreadable", ["config.json", "model.safetensors"])
def test_an_unreadable_model_file_is_named_in_one_line(unreadable, tmp_path):
    """A real chmod 000 file (as root, run without the capabilities that bypass file permissions):
    validate ended in a PermissionError traceback."""
    import os
    import shutil
    import subprocess
    import sys

    from rl_service.models.loading import BUILTIN_MODEL_DIR

    model = shutil.copytree(BUILTIN_MODEL_DIR, tmp_path / "model")
    (model / unreadable).chmod(0)
    command = [sys.executable, "-m", "rl_service.cli", "validate", BASE, "--set", f"model.path={model}"]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root reads a chmod 000 file, and setpriv (util-linux) is not here to drop that")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == EXIT_USER_ERROR and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"rl-service: error: model.path: {model / unreadable}: cannot read (Permission denied)"], result.stderr
