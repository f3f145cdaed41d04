"""The run directory: resolved config, metrics (JSONL + TensorBoard), checkpoints, summary.

Checkpoints are written under a temporary name and renamed into place, so a reader never sees a
half-written `step_N`; `latest` is written last and names the newest complete one.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from rl_service.config import JobConfig, dump_config


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/Inf; null says "not a number" honestly
    return value


class RunDirectory:
    def __init__(self, path: str | Path, config: JobConfig):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.yaml").write_text(dump_config(config), encoding="utf-8")
        self._metrics = open(self.path / "metrics.jsonl", "a", encoding="utf-8")
        self._tensorboard = None
        if config.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(self.path / "tb"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{key: _jsonable(value) for key, value in metrics.items()}}
        self._metrics.write(json.dumps(row, sort_keys=True) + "\n")
        self._metrics.flush()
        if self._tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tensorboard.add_scalar(key, value, step)

    def write_checkpoint(self, step: int, save_model: Callable[[str], None], statistics: dict[str, np.ndarray],
                         trainer_state: dict) -> Path:
        from safetensors.numpy import save_file

        checkpoints = self.path / "checkpoints"
        checkpoints.mkdir(exist_ok=True)
        final = checkpoints / f"step_{step}"
        staging = checkpoints / f".tmp_step_{step}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        save_model(str(staging / "model"))
        save_file({key: np.ascontiguousarray(value) for key, value in statistics.items()},
                  str(staging / "statistics.safetensors"))
        (staging / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2, sort_keys=True), encoding="utf-8")
        _fsync_tree(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        latest_tmp = checkpoints / ".latest.tmp"
        latest_tmp.write_text(final.name, encoding="utf-8")
        os.replace(latest_tmp, checkpoints / "latest")
        return final

    def write_summary(self, summary: dict) -> Path:
        target = self.path / "summary.json"
        target.write_text(json.dumps({k: _jsonable(v) for k, v in summary.items()}, indent=2, sort_keys=True),
                          encoding="utf-8")
        return target

    def close(self) -> None:
        self._metrics.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _fsync_tree(directory: Path) -> None:
    for file in directory.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
