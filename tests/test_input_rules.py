"""Input rules checked before Ray starts (issue #19, findings 4-5): the run-directory rule (an existing
run is continued with --resume or replaced with --overwrite, never appended to) and prompts against
the model's context (refused by default, cut to the budget with `data.long_prompts: truncate`).
The refusals themselves, one line and exit 2, are in tests/bad_inputs (test_bad_inputs.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import EMPTY_SAFETENSORS, REPO, fake_checkpoint
from rl_service.errors import UserError
from rl_service.driver.run_dir import prepare_run_dir


def _fake_run(path, checkpoint: bool):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("job_name: x\n")
    (path / "metrics.jsonl").write_text('{"step": 1}\n')
    (path / "notes.txt").write_text("the user's own file")
    if checkpoint:
        fake_checkpoint(path, 1)


def test_an_existing_run_is_refused_without_resume_or_overwrite(tmp_path):
    _fake_run(tmp_path / "run", checkpoint=True)
    with pytest.raises(UserError, match="already holds a run .*--overwrite"):
        prepare_run_dir(tmp_path / "run")
    assert (tmp_path / "run" / "metrics.jsonl").is_file()      # refused: nothing touched


def test_overwrite_removes_the_run_and_only_the_run(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, checkpoint=True)
    prepare_run_dir(run, overwrite=True, clear=False)           # the check before the job's inputs are known
    assert (run / "metrics.jsonl").is_file()
    prepare_run_dir(run, overwrite=True)
    assert sorted(entry.name for entry in run.iterdir()) == ["notes.txt"]


def test_resume_keeps_a_checkpointed_run_and_restarts_one_without_a_checkpoint(tmp_path):
    _fake_run(tmp_path / "kept", checkpoint=True)
    prepare_run_dir(tmp_path / "kept", resume=True)
    assert (tmp_path / "kept" / "metrics.jsonl").read_text() == '{"step": 1}\n'
    _fake_run(tmp_path / "fresh", checkpoint=False)
    prepare_run_dir(tmp_path / "fresh", resume=True)            # nothing to continue: start over, not append
    assert not (tmp_path / "fresh" / "metrics.jsonl").exists()


def test_new_and_empty_directories_are_fine_and_created(tmp_path):
    prepare_run_dir(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    prepare_run_dir(tmp_path / "a" / "b")                       # empty: not a run yet
    assert list((tmp_path / "a" / "b").iterdir()) == []


def test_kernel_file_systems_are_refused_but_dev_shm_is_an_ordinary_place(tmp_path):
    for path in ("/proc/runs", "/sys/x", "/dev/null_dir"):
        with pytest.raises(UserError, match="a kernel file system"):
            prepare_run_dir(path, clear=False)
    shm = f"/dev/shm/rl_service_test_{tmp_path.name}"
    try:
        prepare_run_dir(shm)
        assert (Path(shm)).is_dir()
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_long_prompts_truncate_cuts_each_prompt_to_the_context_budget(tmp_path):
    from rl_service.config import load_config
    from rl_service.driver import prepare_job
    from rl_service.tasks import PromptTokenizer

    data = tmp_path / "long.jsonl"
    rows = [{"prompt": "add: " + " + ".join(map(str, range(150))), "answer": "11175"},
            {"prompt": "1 + " * 5000 + "1?", "answer": "5001"}, {"prompt": "2 + 2?", "answer": "4"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    overrides = ["data.source=jsonl", f"data.train_path={data}", "data.prompts_per_step=1",
                 "generator.max_new_tokens=56"]
    with pytest.raises(UserError, match="train prompt id 0 is .* tokens, more than the 200"):
        prepare_job(load_config(REPO / "configs" / "quickstart.yaml", overrides))
    job = prepare_job(load_config(REPO / "configs" / "quickstart.yaml", overrides + ["data.long_prompts=truncate"]))
    assert job.task.max_prompt_tokens == 256 - 56
    tokenize = PromptTokenizer(job.tokenizer, True, job.task.max_prompt_tokens)
    full = PromptTokenizer(job.tokenizer, True)
    lengths = [len(tokenize(record)) for record in job.task.train]
    assert lengths[0] == lengths[1] == 200 and lengths[2] == len(full(job.task.train[2])) < 200
    # The end survives (the chat template's generation prompt, what the model continues from).
    assert tokenize(job.task.train[0])[-20:] == full(job.task.train[0])[-20:]


def test_a_50_mb_prompt_is_refused_in_one_line_without_tokenizing_it(tmp_path):
    """Issue #19 finding 4: a 50 MB one-line prompt took the driver to 10 GB and then asked for 100 GB.
    Now the length check refuses it from its character count; the whole `validate` stays small."""
    import subprocess
    import sys

    data = tmp_path / "huge.jsonl"
    with data.open("w") as out:
        out.write(json.dumps({"id": 0, "prompt": "What is 1 + 1? " * (50 * 2**20 // 15), "answer": "2"}) + "\n")
        for index in range(1, 17):
            out.write(json.dumps({"id": index, "prompt": f"{index} + 1?", "answer": str(index + 1)}) + "\n")
    # A fresh parent whose only child is the command, so RUSAGE_CHILDREN's peak is that command's alone.
    measure = ("import resource, subprocess, sys; result = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "sys.stderr.write(result.stderr); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
               "sys.exit(result.returncode)")
    result = subprocess.run([sys.executable, "-c", measure, sys.executable, "-m", "rl_service.cli", "validate",
                             "tests/bad_inputs/configs/base_jsonl.yaml", "--set", f"data.train_path={data}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    peak_mib = int(result.stdout.split()[-1]) / 1024   # ru_maxrss is in KiB on Linux
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train prompt id 0 is 52428" in lines[0] and "characters" in lines[0], lines
    # A few copies of 50 MB of text (file, JSON string, record) beside torch and transformers, never
    # the tokenized prompt (10 GB, then a 100 GB allocation before the fix).
    assert peak_mib < 2048, peak_mib


def test_a_run_that_failed_before_its_first_row_is_no_run_and_its_directory_is_reused(tmp_path):
    # Ray or a role could not start: config.yaml and empty metrics/ledger files, nothing else. Refusing
    # it left a directory that could be neither resumed (no checkpoint) nor run again without --overwrite.
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("job_name: x\n")
    (run / "metrics.jsonl").write_text("")
    (run / "ledger.jsonl").write_text("")
    prepare_run_dir(run)
    assert list(run.iterdir()) == []


def test_resume_falls_back_to_the_newest_complete_checkpoint_and_never_advises_deleting_them(tmp_path, caplog):
    # A user rolled a diverged step back by deleting step_5; the error said "--overwrite", which
    # deletes step_2 to step_4 too. A damaged newest checkpoint is skipped the same way, and said.
    import logging

    from rl_service.config import load_config
    from rl_service.driver.run_dir import latest_checkpoint, resumable_checkpoint

    run = tmp_path / "run"
    for step in (2, 3, 4):
        fake_checkpoint(run, step)
    shutil.rmtree(fake_checkpoint(run, 5))                                   # latest names a deleted one
    config = load_config(None, ["steps=9"])
    assert latest_checkpoint(run).name == "step_4" and resumable_checkpoint(run, config).name == "step_4"
    fake_checkpoint(run, 6)
    (run / "checkpoints" / "step_6" / "trainer_state.json").write_text("garbage")
    with caplog.at_level(logging.WARNING, logger="rl_service"):
        assert resumable_checkpoint(run, config).name == "step_4"
    assert "newer checkpoints cannot be: step_6 (trainer_state.json is not readable)" in caplog.text
    for step in (2, 3, 4):
        (run / "checkpoints" / f"step_{step}" / "learner_state.safetensors").unlink()
    with pytest.raises(UserError, match="no complete checkpoint to resume from: step_6 .*; step_4 .no learner_state"
                                        r"\.safetensors.") as refused:
        resumable_checkpoint(run, config)
    assert "--overwrite" not in str(refused.value)
    # Killed after renaming step_8 into place, before pointing checkpoints/latest at it: step_8 is whole.
    fake_checkpoint(run, 8, latest=False)
    with caplog.at_level(logging.WARNING, logger="rl_service"):
        caplog.clear()
        assert resumable_checkpoint(run, config).name == "step_8"
    assert "cannot be" not in caplog.text        # nothing newer, nothing damaged to speak of


def test_a_checkpoint_whose_weights_folder_lacks_the_weights_is_damaged(tmp_path):
    # model/ without config.json passed the check, and the resume failed after Ray started, in the
    # learner's traceback.
    from rl_service.driver.run_dir import checkpoint_problem

    full, adapter = fake_checkpoint(tmp_path / "full", 2), fake_checkpoint(tmp_path / "lora", 2, adapter=True)
    assert checkpoint_problem(full) is None and checkpoint_problem(adapter) is None
    (full / "model" / "config.json").unlink()
    assert checkpoint_problem(full) == "no model/config.json"
    (full / "model" / "model.safetensors").rename(full / "model" / "pytorch_model.bin")   # never unpickled
    assert checkpoint_problem(full) == "no model/config.json, model/*.safetensors"
    (adapter / "adapter" / "adapter_model.safetensors").unlink()
    assert checkpoint_problem(adapter) == "no adapter/adapter_model.safetensors"


def test_an_async_checkpoint_resumes_only_under_a_staleness_bound_that_takes_its_rollouts(tmp_path):
    # Its rollouts in flight were sampled with older weights; a resume in sync mode (or a smaller
    # bound) failed at the first step's staleness check, after Ray started. Without the file that
    # holds them, the checkpoint is damaged (it had failed with FileNotFoundError inside the run).
    import json

    from rl_service.config import load_config
    from rl_service.driver.run_dir import IN_FLIGHT_ARRAYS, IN_FLIGHT_FILE, checkpoint_problem, resumable_checkpoint

    run = tmp_path / "run"
    checkpoint = fake_checkpoint(run, 2)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 2, "in_flight_steps": [3, 4]}))
    assert checkpoint_problem(checkpoint) == f"no {IN_FLIGHT_FILE}, {IN_FLIGHT_ARRAYS}"
    (checkpoint / IN_FLIGHT_FILE).write_text("[]")
    (checkpoint / IN_FLIGHT_ARRAYS).write_bytes(EMPTY_SAFETENSORS)
    for overrides in (["schedule.mode=sync"], ["schedule.mode=async", "schedule.max_staleness=1"]):
        with pytest.raises(UserError, match=r"schedule: .*steps \[3, 4\].*max_staleness >= 2"):
            resumable_checkpoint(run, load_config(None, ["steps=9", *overrides]))
    config = load_config(None, ["steps=9", "schedule.mode=async", "schedule.max_staleness=2"])
    assert resumable_checkpoint(run, config) == checkpoint


def test_a_checkpoint_holding_batches_of_prompts_the_data_lost_is_refused_before_ray(tmp_path):
    # An offline-pilot chunk still to train, or rollouts in flight, name prompts by id: a train file
    # changed since the run began failed with a KeyError after Ray started.
    import json

    from rl_service.driver.run_dir import IN_FLIGHT_FILE, check_checkpoint_prompts

    checkpoint = fake_checkpoint(tmp_path / "run", 2)
    queue = {"queue": [{"prompt_ids": [3, 4], "counts": [8, 8], "spread": {}}]}
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 2, "batch_source": queue,
                                                               "in_flight_steps": [3]}))
    (checkpoint / IN_FLIGHT_FILE).write_text(json.dumps([{"step": 3, "prompt_ids": [5, 77]}]))
    check_checkpoint_prompts(checkpoint, range(100))
    with pytest.raises(UserError, match=r"no longer has \(ids 4, 77\)"):
        check_checkpoint_prompts(checkpoint, [3, 5])


def test_resume_refuses_to_turn_lora_on_or_off_before_ray_starts(tmp_path):
    # A resume that turned LoRA on failed inside Ray, after rewriting config.yaml with the override,
    # so every later plain resume failed the same way.
    from rl_service.config import load_config
    from rl_service.driver.run_dir import resumable_checkpoint

    fake_checkpoint(tmp_path / "full", 2)
    with pytest.raises(UserError, match="learner.lora: .*step_2 holds full weights, no LoRA adapter, and LoRA "
                                        "cannot be turned on when resuming"):
        resumable_checkpoint(tmp_path / "full", load_config(None, ["steps=4", "learner.lora.rank=8"]))
    fake_checkpoint(tmp_path / "lora", 2, adapter=True)
    with pytest.raises(UserError, match="holds a LoRA adapter .adapter/., and LoRA cannot be turned off"):
        resumable_checkpoint(tmp_path / "lora", load_config(None, ["steps=4"]))
    assert resumable_checkpoint(tmp_path / "lora", load_config(None, ["steps=4", "learner.lora.rank=8"])).name == "step_2"


def test_a_run_whose_checkpoints_are_all_incomplete_is_never_cleared_unasked(tmp_path, capsys, monkeypatch):
    # run --resume took "no complete checkpoint" for "never checkpointed", started over, and deleted
    # the run, checkpoints and metrics with it.
    from rl_service.cli import main

    run = tmp_path / "run"
    _fake_run(run, checkpoint=True)
    (run / "checkpoints" / "step_1" / "learner_state.json").unlink()
    (run / "config.yaml").write_text((REPO / "configs" / "quickstart.yaml").read_text())
    monkeypatch.chdir(REPO)
    assert main(["run", "configs/quickstart.yaml", "--run-dir", str(run), "--resume"]) == 2
    assert "no complete checkpoint to resume from: step_1 (no learner_state.json)" in capsys.readouterr().err
    prepare_run_dir(run, resume=True)
    assert (run / "checkpoints" / "step_1").is_dir() and (run / "metrics.jsonl").is_file()
