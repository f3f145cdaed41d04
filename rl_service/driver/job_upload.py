"""What a submitted job receives as its working directory: the files it needs, nothing else.

Ray uploads a job's `working_dir` whole, and the directory `rl-service submit` runs in may hold
anything: a token file, other runs, `~/.ssh` and `~/.ray` when it is a home directory. So `submit`
and `resume JOB` stage a directory that holds only
- the config file;
- the relative paths the config names (`config_paths`: model, data, preference data, reward model,
  custom reward file and `reward.custom_readable`: a neighbouring module the reward imports travels
  when it is listed there, as the sandbox shows it only then), each under the name the config gives it (a link is copied as what it points to); an absolute path
  is read where it is, so it must exist on the cluster's nodes, as before;
- where the working directory is an rl_service checkout, its `rl_service/` and `actors/` packages,
  so the job runs the code that was submitted;
each at its path relative to the working directory, so the config's relative paths resolve there
as they do here. The list goes into the job's metadata (`rl_service_files`), so `resume JOB` sends
the same files again. The stage is removed once Ray has taken its copy (`submit_job` uploads it).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CODE_PACKAGES = ("rl_service", "actors")
FILES_METADATA = "rl_service_files"   # the job's files, relative to where it was submitted (JSON list)
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "*.egg-info")


def config_paths(config) -> list[tuple[str, str]]:
    """(field, path) of every file or directory the config makes the job read."""
    paths = []
    if config.model.path != "builtin":
        paths.append(("model.path", config.model.path))
    if config.data.source == "jsonl":
        paths += [(field, value) for field, value in (("data.train_path", config.data.train_path),
                                                      ("data.eval_path", config.data.eval_path)) if value]
    if config.data.source == "hf" and config.data.hf is not None:
        paths.append(("data.hf.path", config.data.hf.path))   # a local dataset directory (rl_service/data/hf_datasets.py)
    if config.algorithm.is_preference:
        preference = config.preference
        if preference.mode == "offline" and preference.dataset_path:
            paths.append(("preference.dataset_path", preference.dataset_path))
        if preference.reward_source == "reward_model" and preference.reward_model_path:
            paths.append(("preference.reward_model_path", preference.reward_model_path))
    if config.reward.custom:
        paths.append(("reward.custom", config.reward.custom.rsplit(":", 1)[0]))
        paths += [(f"reward.custom_readable[{index}]", value) for index, value in enumerate(config.reward.custom_readable)]
    return paths


def relative_inside(path: Path) -> Path | None:
    """A relative `path` as the config names it (links and `..` kept: the job's open() walks the same
    components), when it stays inside the working directory; None for an absolute path (the job reads it where
    it is) or one that leaves the directory (it never reached the job)."""
    if path.is_absolute():
        return None
    return None if Path(os.path.normpath(path)).parts[:1] in (("..",), (".",)) else path


def job_files(working_dir: Path, config=None, config_path: Path | None = None, also=()) -> list[Path]:
    """The paths, relative to `working_dir`, that a job submitted from there receives: `config_path`,
    what `config` names (not the custom reward's other neighbours: `aws_creds.py` next to it once
    travelled to the cluster), `also` (a resumed job's files, kept in its first job's metadata) and the code of
    a checkout."""
    named: list[Path] = [Path(path) for path in also]
    if config_path is not None:
        named.append(Path(config_path).resolve().relative_to(working_dir))
    if config is not None:
        named += [Path(value) for _, value in config_paths(config)]
    if (working_dir / "rl_service" / "__init__.py").is_file():
        named += [Path(package) for package in CODE_PACKAGES if (working_dir / package).is_dir()]
    files: dict[Path, Path] = {}   # as named, by where it lands
    for path in named:
        relative = relative_inside(path)
        if relative is not None and (working_dir / relative).exists():
            files.setdefault(Path(os.path.normpath(relative)), relative)
    # A path inside another one already listed comes with it.
    return [named for lands, named in files.items()
            if not any(other != lands and lands.is_relative_to(other) for other in files)]


@contextmanager
def staged_working_dir(working_dir: Path, files: list[Path]) -> Iterator[Path]:
    """A temporary directory holding `files` (relative to `working_dir`) at their relative paths."""
    stage = Path(tempfile.mkdtemp(prefix="rl_service_job_"))
    try:
        for relative in files:
            source, target = working_dir / relative, stage / relative
            target.parent.mkdir(parents=True, exist_ok=True)   # with `sub/..`, `sub` too, as the job's open() needs
            if source.is_dir():
                shutil.copytree(source, target, ignore=_IGNORED)
            else:
                shutil.copy2(source, target)
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
