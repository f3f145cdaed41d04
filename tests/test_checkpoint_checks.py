"""What a user points `resume`, `run --resume` and `eval` at, checked before Ray starts: damaged
checkpoints passed over by their safetensors headers, a changed config named field by field, the run
directory announced only once it is used, and run or checkpoint directories evaluated as their model."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import REPO, one_line_cli_error
from rl_service.config import dump_config, load_config
from rl_service.driver.run_dir import (IN_FLIGHT_ARRAYS, IN_FLIGHT_FILE, checkpoint_problem, latest_checkpoint,
                                       resumable_checkpoint)
from rl_service.errors import UserError
from rl_service.models.loading import BUILTIN_MODEL_DIR, safetensors_problem


def _arrays(path: Path, **arrays) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(arrays or {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "n": np.zeros(5, np.int64)}, str(path))
    return path


def _checkpoint(run: Path, step: int, adapter: bool = False, in_flight: bool = False) -> Path:
    """A checkpoint whose every file is whole (real safetensors, the built-in model's weights), not
    one a learner would restore: for the checks made before Ray starts."""
    checkpoint = run / "checkpoints" / f"step_{step}"
    if adapter:
        _arrays(checkpoint / "adapter" / "adapter_model.safetensors")
        (checkpoint / "adapter" / "adapter_config.json").write_text("{}")
    else:
        shutil.copytree(BUILTIN_MODEL_DIR, checkpoint / "model")
    _arrays(checkpoint / "learner_state.safetensors")
    _arrays(checkpoint / "statistics.safetensors")
    (checkpoint / "learner_state.json").write_text("{}")
    state = {"step": step, **({"in_flight_steps": [step + 1]} if in_flight else {})}
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    if in_flight:
        (checkpoint / IN_FLIGHT_FILE).write_text("[]")
        _arrays(checkpoint / IN_FLIGHT_ARRAYS)
    (run / "checkpoints" / "latest").write_text(checkpoint.name)
    return checkpoint


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)


def test_a_safetensors_file_cut_short_grown_or_overwritten_is_named_from_its_header(tmp_path):
    whole = _arrays(tmp_path / "whole.safetensors")
    assert safetensors_problem(whole) is None
    assert safetensors_problem(_arrays(tmp_path / "empty.safetensors", **{})) is None
    data = whole.read_bytes()
    for size, problem in [(0, "shorter than a safetensors header"), (100, "its header claims"),
                          (len(data) - 1, "truncated or overwritten")]:
        (tmp_path / "cut.safetensors").write_bytes(data[:size])
        assert problem in safetensors_problem(tmp_path / "cut.safetensors"), size
    (tmp_path / "grown.safetensors").write_bytes(data + b"\0")
    assert "truncated or overwritten" in safetensors_problem(tmp_path / "grown.safetensors")
    (tmp_path / "text.safetensors").write_bytes((20).to_bytes(8, "little") + b"not json at all, no!")
    assert safetensors_problem(tmp_path / "text.safetensors") == "its header is not a JSON object"
    bad = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}).encode()
    (tmp_path / "offsets.safetensors").write_bytes(len(bad).to_bytes(8, "little") + bad)
    assert safetensors_problem(tmp_path / "offsets.safetensors") == "tensor 'x' has no valid data_offsets"


def test_a_big_checkpoint_file_is_checked_by_its_header_alone(tmp_path):
    # 8 GiB of float32 as a sparse file: the check must not read (or load) the data to pass it.
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**31], "data_offsets": [0, 2**33]}}).encode()
    big = tmp_path / "big.safetensors"
    big.write_bytes(len(header).to_bytes(8, "little") + header)
    _truncate(big, 8 + len(header) + 2**33)
    assert safetensors_problem(big) is None
    _truncate(big, 8 + len(header) + 2**33 - 1)
    assert "truncated or overwritten" in safetensors_problem(big)


@pytest.mark.parametrize("damaged", ["model/model.safetensors", "learner_state.safetensors", "statistics.safetensors",
                                     "adapter/adapter_model.safetensors", IN_FLIGHT_ARRAYS, "trainer_state.json"])
def test_resume_passes_over_a_newer_checkpoint_with_a_damaged_file_and_says_which(tmp_path, caplog, damaged):
    # Truncating step_5's learner state let it be chosen; the resume died after Ray started, in a
    # SafetensorError traceback.
    adapter, in_flight = damaged.startswith("adapter/"), damaged == IN_FLIGHT_ARRAYS
    run = tmp_path / "run"
    _checkpoint(run, 3, adapter=adapter, in_flight=in_flight)
    newest = _checkpoint(run, 5, adapter=adapter, in_flight=in_flight)
    assert checkpoint_problem(newest) is None and latest_checkpoint(run) == newest
    _truncate(newest / damaged, 100)
    assert damaged in checkpoint_problem(newest)
    assert latest_checkpoint(run).name == "step_3"
    overrides = ["steps=6", *(["learner.lora.rank=4"] if adapter else []),
                 *(["schedule.mode=async", "schedule.max_staleness=1"] if in_flight else [])]
    with caplog.at_level(logging.WARNING, logger="rl_service"):
        assert resumable_checkpoint(run, load_config(None, overrides)).name == "step_3"
    assert f"resuming from step_3; newer checkpoints cannot be: step_5 ({damaged} is " in caplog.text


def _saved_run(tmp_path: Path, config_file: str, overrides: list[str]) -> Path:
    run = tmp_path / "run"
    _checkpoint(run, 2)
    (run / "config.yaml").write_text(dump_config(load_config(REPO / config_file, overrides)))
    return run


def test_run_resume_with_a_changed_config_names_the_fields_that_differ(tmp_path, capsys, monkeypatch):
    # It said only "differs from RUN/config.yaml": the user had to diff two YAML files by hand.
    run = _saved_run(tmp_path, "configs/quickstart.yaml", ["steps=6", "learner.lr=2e-4"])
    line = one_line_cli_error(["run", "configs/quickstart.yaml", "--run-dir", run, "--resume",
                               "--set", "steps=6", "--set", "generator.temperature=0.5"], capsys, monkeypatch)
    assert (f"configs/quickstart.yaml: differs from {run}/config.yaml, the config the run started with "
            "(generator.temperature: the run has 1.0, given 0.5; learner.lr: the run has 0.0002, given 0.0001); "
            f"continue it with `rl-service resume {run} [--set KEY=VALUE]`") in line
    line = one_line_cli_error(["run", "configs/quickstart.yaml", "--run-dir", run, "--resume"], capsys, monkeypatch)
    assert "(steps: the run has 6, given 100; " in line and "; and " not in line   # two fields: both shown
    line = one_line_cli_error(["run", "configs/quickstart.yaml", "--run-dir", run, "--resume", "--set", "seed=1",
                               "--set", "eval_every=3", "--set", "data.prompts_per_step=2"], capsys, monkeypatch)
    assert "(seed: the run has 0, given 1; steps: the run has 6, given 100; eval_every: " in line
    assert "; and 2 more)" in line


def _stdout_of_refusal(args: list, capsys, monkeypatch) -> tuple[str, str]:
    monkeypatch.chdir(REPO)
    from rl_service.cli import EXIT_USER_ERROR, main

    assert main([str(arg) for arg in args]) == EXIT_USER_ERROR
    return capsys.readouterr()


def test_a_refused_run_or_resume_announces_no_run_directory(tmp_path, capsys, monkeypatch):
    # "run directory: PATH" came first, then the refusal, and PATH was never created.
    monkeypatch.setenv("RL_SERVICE_SUBMISSION_ID", "checkpoint-checks")
    out, err = _stdout_of_refusal(["run", "configs/quickstart.yaml", "--set", "learner.num_gpus=64",
                                   "--run-dir", tmp_path / "gpu"], capsys, monkeypatch)
    assert "64 GPU" in err and "run directory" not in out and not (tmp_path / "gpu").exists()
    out, err = _stdout_of_refusal(["resume", tmp_path / "nonexist"], capsys, monkeypatch)
    assert "not a run directory" in err and "run directory:" not in out


def test_a_default_run_directory_refused_names_logging_output_dir_not_run_dir(capsys, monkeypatch):
    # It said "--run-dir /dev/null/<run id>", a flag the user had not passed.
    line = one_line_cli_error(["run", "configs/quickstart.yaml", "--set", "logging.output_dir=/dev/null"],
                              capsys, monkeypatch)
    assert line.startswith("rl-service: error: logging.output_dir /dev/null (run directory "
                           "/dev/null/bad-inputs-corpus): under /dev, a kernel file system"), line
    assert "--run-dir" not in line


def test_eval_of_a_run_or_checkpoint_directory_evaluates_its_model(tmp_path, capsys):
    # It said "model.path: RUN has no config.json", a field the user never set.
    from rl_service.cli import _model_to_evaluate, main

    run = tmp_path / "run"
    _checkpoint(run, 2)
    newest = _checkpoint(run, 4)
    _truncate(newest / "learner_state.safetensors", 100)   # damaged: not the run's newest complete checkpoint
    (run / "checkpoints" / "latest").write_text("step_2")
    step_2 = run / "checkpoints" / "step_2"
    assert main(["eval", str(run), "--set", "data.arithmetic.num_eval=4", "--set", "generator.max_new_tokens=8"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["eval_prompts"] == 4.0
    assert f"rl-service eval: evaluating {step_2 / 'model'}" in err
    assert _model_to_evaluate(str(step_2)) == (str(step_2 / "model"), None)
    assert _model_to_evaluate(str(run / "checkpoints" / "latest")) == (str(step_2 / "model"), None)
    assert _model_to_evaluate(str(step_2 / "model")) == (str(step_2 / "model"), None)
    assert _model_to_evaluate("builtin") == ("builtin", None)


def test_eval_of_a_lora_checkpoint_merges_its_adapter_into_the_base_it_trained(tmp_path, capsys):
    """A LoRA run saved without model/ (learner.lora.save_merged: false) was refused by eval. Its
    adapter/ over config.yaml's model.path scores what a model merged by peft itself scores."""
    import peft
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rl_service.cli import main
    from rl_service.config.lora import LoraConfig
    from rl_service.training.lora import peft_config

    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(BUILTIN_MODEL_DIR), peft_config(LoraConfig(rank=4)))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:   # B starts at 0: give the adapter an effect
                parameter.normal_(std=0.05)
    step = tmp_path / "run" / "checkpoints" / "step_3"
    model.save_pretrained(step / "adapter")
    (step / "config.yaml").write_text("model:\n  path: builtin\ndata:\n  train_path: gone.jsonl\n")
    merged = tmp_path / "merged"
    shutil.copytree(BUILTIN_MODEL_DIR, merged)
    model.merge_and_unload().save_pretrained(merged)   # the reference: peft's own merge
    assert not torch.equal(load_file(str(merged / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"],
                           load_file(str(BUILTIN_MODEL_DIR / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"])
    settings = ["--set", "data.arithmetic.num_eval=16", "--set", "generator.max_new_tokens=16"]
    scores = {}
    for name, given in (("checkpoint", step), ("adapter", step / "adapter"), ("merged", merged)):
        assert main(["eval", str(given), *settings]) == 0
        out, err = capsys.readouterr()
        scores[name] = json.loads(out)
        if name != "merged":
            assert f"rl-service eval: evaluating {step / 'adapter'} merged into its base builtin" in err
    assert scores["checkpoint"] == scores["adapter"] == scores["merged"]


def test_eval_says_which_path_to_pass_when_a_directory_holds_no_model(tmp_path):
    from rl_service.cli import _model_to_evaluate

    lora = _checkpoint(tmp_path / "lora", 2, adapter=True)
    (lora / "config.yaml").unlink(missing_ok=True)
    with pytest.raises(UserError, match="step_2: holds a LoRA adapter .adapter/. but no config.yaml naming its base model"):
        _model_to_evaluate(str(lora))
    with pytest.raises(UserError, match="a run directory with no complete checkpoint to evaluate"):
        (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
        _model_to_evaluate(str(tmp_path / "empty"))
    (tmp_path / "empty" / "checkpoints" / "latest").write_text("step_9")
    with pytest.raises(UserError, match=f"latest: names step_9, which is not there; pass the run directory "
                                        f"{tmp_path / 'empty'} to evaluate"):
        _model_to_evaluate(str(tmp_path / "empty" / "checkpoints" / "latest"))


@pytest.mark.parametrize("job_id", [None, "quickstart-20261207-120000-abc123"])
def test_a_stop_tells_a_submitted_job_to_resume_as_a_job(tmp_path, job_id):
    """A submitted job's stop line said `rl-service resume RUN_DIR` (a local run, off the cluster) and
    the literal `JOB_ID`; the job is now named. A local run is told its run directory."""
    import subprocess
    import sys

    run = tmp_path / "run"
    _checkpoint(run, 2)
    env = {name: value for name, value in os.environ.items() if name != "RL_SERVICE_SUBMISSION_ID"}
    if job_id:
        env["RL_SERVICE_SUBMISSION_ID"] = job_id   # as submit's runtime env sets it, before the process starts
    code = ("import sys; from pathlib import Path; from rl_service.driver.stop_signal import resume_hint; "
            "print(resume_hint(Path(sys.argv[1])))")
    said = subprocess.run([sys.executable, "-c", code, str(run)], cwd=REPO, env=env, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert said == f"{run}: newest checkpoint step_2: continue with `rl-service resume {job_id or run}`"
