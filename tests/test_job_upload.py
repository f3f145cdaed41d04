"""What a submitted job receives (rl_service/driver/job_upload.py) and one run per run directory (run_dir.lock_run_dir)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from rl_service.config import load_config
from rl_service.driver.job_upload import job_files, staged_working_dir
from rl_service.driver.run_dir import lock_run_dir
from rl_service.errors import UserError


def _write(path, text="x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_job_receives_its_config_the_paths_it_names_and_the_code_never_the_rest(tmp_path, monkeypatch):
    work, outside = tmp_path / "work", tmp_path / "outside"
    _write(work / "configs" / "job.yaml", "job_name: j\n")
    _write(work / "data" / "train.jsonl")
    _write(work / "data" / "unrelated.jsonl")
    _write(work / "rewards" / "score.py", "def reward(c, a):\n    return 1.0\n")
    _write(work / "rewards" / "helper.py")
    _write(work / "rewards" / "secret.txt")
    _write(work / "rewards" / "aws_creds.py", "KEY = 'AKIA...'\n")
    _write(work / "token", "RAY_AUTH_TOKEN")            # what a home directory or a cluster admin's folder holds
    _write(work / ".ssh" / "id_ed25519")
    _write(work / "runs" / "old" / "metrics.jsonl")
    _write(work / "rl_service" / "__init__.py")          # an rl_service checkout: its code travels
    _write(work / "rl_service" / "__pycache__" / "x.pyc")
    _write(work / "actors" / "generator.py")
    _write(outside / "eval.jsonl")
    monkeypatch.chdir(work)
    config = load_config(work / "configs" / "job.yaml",
                         ["data.source=jsonl", "data.train_path=data/train.jsonl", f"data.eval_path={outside / 'eval.jsonl'}",
                          "reward.custom=rewards/score.py:reward", "reward.custom_readable=[rewards/helper.py]"])
    files = job_files(work, config, work / "configs" / "job.yaml")
    # helper.py is listed; the secrets next to it, a module among them, are not, and stay here.
    assert sorted(map(str, files)) == ["actors", "configs/job.yaml", "data/train.jsonl", "rewards/helper.py",
                                       "rewards/score.py", "rl_service"]
    with staged_working_dir(work, files) as stage:
        staged = sorted(str(path.relative_to(stage)) for path in stage.rglob("*") if path.is_file())
        assert staged == ["actors/generator.py", "configs/job.yaml", "data/train.jsonl", "rewards/helper.py",
                          "rewards/score.py", "rl_service/__init__.py"]
        assert (stage / "rewards" / "score.py").read_text() == (work / "rewards" / "score.py").read_text()
    assert not stage.exists()
    # Not a checkout, nothing named: a resumed job gets an empty directory, not the user's home ...
    assert job_files(outside) == []
    # ... and a resumed job gets the files its first job received (kept in that job's metadata).
    assert job_files(outside, also=["eval.jsonl", "gone.jsonl"]) == [Path("eval.jsonl")]


def test_paths_keep_the_names_the_config_gives_them(tmp_path, monkeypatch):
    # A link is copied as what it points to, under the link's name; a path through `..` keeps its
    # components, since the job's open() walks them.
    work = tmp_path / "work"
    _write(work / "configs" / "job.yaml", "job_name: j\n")
    _write(tmp_path / "elsewhere" / "train.jsonl", "linked")
    (work / "data").mkdir()
    (work / "data" / "train.jsonl").symlink_to(tmp_path / "elsewhere" / "train.jsonl")
    _write(work / "data" / "real" / "eval.jsonl", "eval")
    (work / "sub").mkdir()
    monkeypatch.chdir(work)
    config = load_config(work / "configs" / "job.yaml", ["data.source=jsonl", "data.train_path=data/train.jsonl",
                                                         "data.eval_path=sub/../data/real/eval.jsonl"])
    files = job_files(work, config, work / "configs" / "job.yaml")
    assert sorted(map(str, files)) == ["configs/job.yaml", "data/train.jsonl", "sub/../data/real/eval.jsonl"]
    with staged_working_dir(work, files) as stage:
        assert (stage / "data" / "train.jsonl").read_text() == "linked" and not (stage / "data" / "train.jsonl").is_symlink()
        with open(os.path.join(stage, "sub/../data/real/eval.jsonl")) as named:   # as the job opens it
            assert named.read() == "eval"


def test_one_run_or_resume_of_a_directory_at_a_time(tmp_path):
    held = lock_run_dir(tmp_path)
    try:
        with pytest.raises(UserError, match=rf"in use by another run or resume of it \(pid {os.getpid()} on "):
            lock_run_dir(tmp_path)
    finally:
        os.close(held)
    os.close(lock_run_dir(tmp_path))   # released with its holder


def test_a_second_resume_of_a_run_in_use_is_refused_before_ray_starts(tmp_path):
    # Two `rl-service resume JOB` 2 s apart both trained the same steps into one run directory.
    from test_cli import rl_service

    from conftest import fake_checkpoint

    run = tmp_path / "run"
    fake_checkpoint(run, 2)
    (run / "config.yaml").write_text("steps: 4\n")
    held = lock_run_dir(run)   # the first resume, still running
    try:
        result = rl_service("resume", str(run))
    finally:
        os.close(held)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{run}: in use by another run or resume of it (pid {os.getpid()} on " in result.stderr


def test_resume_job_finds_the_files_its_job_was_submitted_with_or_names_the_missing(tmp_path):
    # `rl-service resume JOB` from another directory than the submit's sent none of the job's files; the new
    # job failed on the cluster ("reward.custom: configs/rewards/format_bonus.py: file not found").
    from rl_service.driver.job_runs import missing_job_files

    (tmp_path / "configs" / "rewards").mkdir(parents=True)
    (tmp_path / "configs" / "job.yaml").write_text("steps: 1\n")
    (tmp_path / "configs" / "rewards" / "bonus.py").write_text("def reward(c, a):\n    return 0.0\n")
    received = ["configs/job.yaml", "configs/rewards/bonus.py"]
    assert missing_job_files(tmp_path, received) == []
    elsewhere = tmp_path / "configs"
    assert missing_job_files(elsewhere, received) == received
