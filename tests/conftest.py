"""Shared fixtures: a short real run (real Ray, real DeepSpeed, the shipped tiny model) reused by tests."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]


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


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def short_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("short_run")
    summary = run_short_job(run_dir)
    return run_dir, summary
