"""`rl-service report`: real matplotlib on a synthetic metrics.jsonl with the keys the driver logs.

Light on purpose (no Ray, no training): the run directory is written by the test.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from rl_service.cli import EXIT_USER_ERROR, main
from rl_service.report import PLOTS

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _train_row(step: int, *, gvm: bool, bvpo: bool) -> dict:
    row = {"step": step, "reward_mean": 0.3 + 0.01 * step, "accepted_fraction": 0.25 + 0.01 * step,
           "completions_per_s": 110.0 + step, "tokens_per_s": 3300.0 + 10 * step, "weight_version": float(step),
           "time_generate_s": 1.1, "time_reward_s": 0.01, "time_statistics_s": 0.005, "time_train_s": 1.0 + 0.01 * step,
           "time_publish_s": 0.04, "time_driver_s": 0.003, "step_seconds": 2.2}
    if gvm:
        row.update({"allocation_samples_min": 1.0, "allocation_samples_median": 6.0, "allocation_samples_max": 20.0 - step % 5,
                    "allocation_hardest_decile_share": 0.3, "allocation_zero_fraction": 0.05})
    if bvpo:
        row.update({"bvpo_alpha": 0.5 + 0.01 * step, "alpha": 0.5 + 0.01 * step, "reward_mean_reasoning_on": 0.4,
                    "reward_mean_reasoning_off": 0.2})
    return row


def _eval_row(step: int, sampled: bool = True) -> dict:
    if not sampled:
        return {"step": step, "eval_accuracy": 0.45 + 0.005 * step, "eval_accuracy_level_1": 0.85, "eval_seconds": 1.0}
    pass_at_k = {f"eval_pass_at_{k}": min(1.0, 0.3 + 0.1 * k + 0.002 * step) for k in range(1, 5)}   # eval.samples: 4
    return {"step": step, "eval_accuracy": 0.45 + 0.005 * step, "eval_accuracy_level_1": 0.85, "eval_seconds": 1.0,
            **pass_at_k, "eval_mean_at_4": pass_at_k["eval_pass_at_1"]}


def write_run(run_dir: Path, steps: int = 20, *, gvm: bool = True, bvpo: bool = True, sampled: bool = True) -> Path:
    """A run directory whose metrics.jsonl is laid out as RunDirectory.log writes it (`sampled`: eval.samples set)."""
    rows = [_eval_row(0, sampled)]
    for step in range(1, steps + 1):
        rows.append(_train_row(step, gvm=gvm, bvpo=bvpo))
        if step % 10 == 0:
            rows.append(_eval_row(step, sampled))
    rows[3]["reward_mean"] = None   # a non-finite value is logged as null: a gap, not a failure
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows), encoding="utf-8")
    return metrics


def assert_real_png(path: Path, width: int, height: int) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > 10_000, f"{path} is suspiciously small ({len(data)} bytes)"
    assert data[12:16] == b"IHDR" and struct.unpack(">II", data[16:24]) == (width, height)
    from matplotlib.image import imread

    pixels = imread(path)
    assert pixels.std() > 0.01, f"{path} is blank"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["report", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def _keep_environment(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")   # main() sets it when unset; keep the session's env as it was


def test_every_plot_written_as_a_real_png(tmp_path, capsys):
    run_dir = tmp_path / "run"
    write_run(run_dir)
    code, out, err = run_cli(capsys, str(run_dir))
    assert code == 0, err
    written = [Path(line) for line in out.splitlines()]
    assert [path.name for path in written] == [plot.filename for plot in PLOTS]
    for path, plot in zip(written, PLOTS):
        assert path.parent == run_dir / "report"   # the default output directory
        width, height = (int(plot.size[0] * 100), int(plot.size[1] * 100))
        assert_real_png(path, width, height)
    assert "skipped" not in err


def test_out_directory_and_absent_metrics_skipped_with_one_line_each(tmp_path, capsys):
    run_dir, out_dir = tmp_path / "run", tmp_path / "plots" / "nested"
    write_run(run_dir, gvm=False, bvpo=False, sampled=False)   # a plain GRPO run: no GVM statistics, no α̂, no pass@k
    code, out, err = run_cli(capsys, str(run_dir), "--out", str(out_dir))
    assert code == 0, err
    names = sorted(Path(line).name for line in out.splitlines())
    assert names == ["eval_accuracy.png", "reward.png", "step_time.png", "throughput.png"]
    assert all(Path(line).parent == out_dir for line in out.splitlines())
    skipped = [line for line in err.splitlines() if "skipped" in line]
    assert len(skipped) == 3
    assert any("gvm_allocation.png" in line for line in skipped) and any("alpha_hat.png" in line for line in skipped)
    assert any("pass_at_k.png" in line for line in skipped)


def test_malformed_line_exits_2_naming_file_and_line(tmp_path):
    run_dir = tmp_path / "run"
    metrics = write_run(run_dir, steps=5)
    lines = metrics.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[2] = '{"step": 2, "reward_mean": 0.5\n'   # line 3: truncated object, followed by good lines
    metrics.write_text("".join(lines), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "rl_service.cli", "report", str(run_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_USER_ERROR
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and f"{metrics}:3: not valid JSON" in errors[0], result.stderr
    assert not (run_dir / "report").exists() or not any((run_dir / "report").iterdir())


@pytest.mark.parametrize("case, expected", [
    ("missing_dir", "run directory not found"),
    ("missing_metrics", "metrics.jsonl: metrics file not found"),
    ("empty_metrics", "metrics.jsonl: no metrics rows"),
    ("not_an_object", "metrics.jsonl:2: expected a JSON object per line, got list"),
    ("no_step", "metrics.jsonl:2: needs a non-negative integer 'step'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case, expected):
    run_dir = tmp_path / "run"
    if case != "missing_dir":
        run_dir.mkdir()
    metrics = run_dir / "metrics.jsonl"
    if case == "empty_metrics":
        metrics.write_text("\n", encoding="utf-8")
    elif case in ("not_an_object", "no_step"):
        second = "[1, 2]" if case == "not_an_object" else '{"reward_mean": 0.5}'
        metrics.write_text(json.dumps(_eval_row(0)) + "\n" + second + "\n", encoding="utf-8")
    code, out, err = run_cli(capsys, str(run_dir))
    assert code == EXIT_USER_ERROR and out == ""
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 1 and expected in errors[0] and str(run_dir) in errors[0], err


def test_incomplete_last_line_of_a_live_run_is_left_out(tmp_path, capsys):
    run_dir = tmp_path / "run"
    metrics = write_run(run_dir, steps=5)
    with open(metrics, "a", encoding="utf-8") as handle:
        handle.write('{"step": 6, "reward_m')   # the writer is mid-line: no newline yet
    code, out, err = run_cli(capsys, str(run_dir), "--out", str(tmp_path / "plots"))
    assert code == 0, err
    assert "reward.png" in out
    line_number = len(metrics.read_text(encoding="utf-8").split("\n"))
    assert f"metrics.jsonl:{line_number}: left out an incomplete last line" in err
