"""Preference data (ALGORITHMS.md §BVPO.2, §BVPO.7): JSONL rows and their bad-row handling, online pair
construction, tokenization with reasoning on / off, the bundled dataset, and the config checks."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rl_service.config import load_config
from rl_service.data.preferences import (PreferenceRow, best_vs_worst, load_preference_file, pairs_from_rollout,
                                         random_ordered_pairs, select_pairs, tokenize_row)
from rl_service.errors import ConfigError, DataError
from rl_service.rollout import Rollout

REPO = Path(__file__).resolve().parents[1]
GOOD = {"prompt": "What is 3 + 4?", "answer": "7", "trace_chosen": "<think>\n3+4=7. So 7.\n</think>\n\n7",
        "trace_rejected": "<think>\n3+4=8. So 8.\n</think>\n\n8", "empty_chosen": "7", "empty_rejected": "8"}


def _line(**changes) -> bytes:
    row = {**GOOD, **changes}
    return json.dumps({k: v for k, v in row.items() if v is not None}).encode()


def _write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_good_rows_load_with_ids(tmp_path):
    path = _write(tmp_path / "prefs.jsonl", [_line(), b"", _line(id=42, prompt="What is 1 + 1?")])
    dataset = load_preference_file(path)
    assert [row.pair_id for row in dataset.rows] == [0, 42]
    assert dataset.rows[0] == PreferenceRow(0, GOOD["prompt"], "7", GOOD["trace_chosen"], GOOD["trace_rejected"], "7", "8")
    assert dataset.num_skipped == 0


def test_bad_rows_are_named_by_line_and_skipped_with_a_count(tmp_path):
    lines = [
        _line(),                                              # 1 good
        _line(empty_rejected=None),                           # 2 missing field
        _line(trace_rejected=GOOD["trace_chosen"]),           # 3 identical chosen / rejected (trace)
        _line(empty_rejected="7"),                            # 4 identical (empty)
        '{"prompt": "caf\xe9"}'.encode("latin-1"),            # 5 not UTF-8
        b"{not json",                                         # 6
        _line(id=0),                                          # 7 duplicate id (line 1 has id 0)
        _line(prompt=""),                                     # 8 empty field
        _line(id=9, answer=[1]),                              # 9 bad answer type
        _line(id=10),                                         # 10 good
    ]
    path = _write(tmp_path / "prefs.jsonl", lines)
    dataset = load_preference_file(path)
    assert [row.pair_id for row in dataset.rows] == [0, 10]
    assert dataset.num_skipped == 8
    expected = {2: "missing field 'empty_rejected'", 3: "trace_chosen and trace_rejected are identical",
                4: "empty_chosen and empty_rejected are identical", 5: "not valid UTF-8", 6: "not valid JSON",
                7: "duplicate id 0 (first on line 1)", 8: "field 'prompt' must be a non-empty string",
                9: "field 'answer' must be a string or number"}
    for message, (line, why) in zip(dataset.bad_rows, sorted(expected.items())):
        assert message.startswith(f"{path}:{line}: ") and why in message, message


@pytest.mark.parametrize("line, why", [(_line(trace_chosen=None), "missing field 'trace_chosen'"),
                                       (b"\xff\xfe{}", "not valid UTF-8"),
                                       (_line(empty_chosen="8"), "empty_chosen and empty_rejected are identical"),
                                       (_line()[:-1] + b', "trace_chosen": "other"}',
                                        "field 'trace_chosen' appears twice in the row")])
def test_on_bad_row_error_stops_at_the_first_bad_row(tmp_path, line, why):
    path = _write(tmp_path / "prefs.jsonl", [_line(), line, _line(id=5)])
    with pytest.raises(DataError) as error:
        load_preference_file(path, on_bad_row="error")
    assert str(error.value).startswith(f"{path}:2: {why}")


def test_no_usable_rows_and_missing_file_are_errors(tmp_path):
    with pytest.raises(DataError, match="no usable preference rows"):
        load_preference_file(_write(tmp_path / "bad.jsonl", [b"[]", _line(prompt=None)]))
    with pytest.raises(DataError, match="dataset file not found"):
        load_preference_file(tmp_path / "missing.jsonl")


# -- online pairs ------------------------------------------------------------------------------

def test_best_vs_worst_and_ties():
    rewards = [0.0, 1.0, 1.0, 0.0, 0.5, 0.5]
    assert best_vs_worst(rewards, [0, 1, 2, 3]) == (1, 0)     # first among equals
    assert best_vs_worst(rewards, [4, 5]) is None             # tie
    assert best_vs_worst(rewards, [1]) is None                # one sample is no pair


def test_select_pairs_keeps_prompts_with_a_pair_in_both_modes():
    # 3 prompts × 2 samples per mode. Requests 0..2: reasoning on; 3..5: reasoning off.
    request_index = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    rewards = [1, 0,   1, 1,   0, 1,   0, 1,   1, 0,   1, 0]
    selection = select_pairs(rewards, request_index, 3, with_empty=True)
    # prompt 1 ties with reasoning on, so it is dropped although its reasoning-off samples differ
    kept = dict(zip(selection.prompts, zip(selection.trace, selection.empty)))
    assert kept == {0: ((0, 1), (7, 6)), 2: ((5, 4), (10, 11))}
    assert selection.counts == {"trace_ties": 1.0, "empty_ties": 0.0, "prompts_without_pair": 1.0, "pairs": 2.0,
                                "trace_pairs": 2.0, "empty_pairs": 2.0, "trace_pair_yield": 2 / 3, "empty_pair_yield": 1.0}

    trace_only = select_pairs(rewards, request_index[:6], 3, with_empty=False)
    assert trace_only.prompts == [0, 2] and trace_only.empty == [] and trace_only.counts["empty_ties"] == 0
    assert "empty_pair_yield" not in trace_only.counts and trace_only.counts["trace_pairs"] == 2


def test_per_term_pairing_keeps_a_prompt_with_a_pair_in_one_mode_only():
    # prompt 0: both modes; prompt 1: reasoning-off pair only; prompt 2: trace pair only; prompt 3: none.
    # Reasoning off gets 3 samples a prompt (off_samples_per_prompt), reasoning on 2.
    request_index = [0, 0, 1, 1, 2, 2, 3, 3] + [4, 4, 4, 5, 5, 5, 6, 6, 6, 7, 7, 7]
    rewards = [1, 0, 1, 1, 0, 1, 0, 0] + [0, 1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0]
    selection = select_pairs(rewards, request_index, 4, with_empty=True, pairing="per_term")
    kept = dict(zip(selection.prompts, zip(selection.trace, selection.empty)))
    assert kept == {0: ((0, 1), (9, 8)), 1: (None, (13, 11)), 2: ((5, 4), None)}
    assert selection.counts == {"trace_ties": 2.0, "empty_ties": 2.0, "prompts_without_pair": 1.0, "pairs": 3.0,
                                "trace_pairs": 2.0, "empty_pairs": 2.0, "trace_pair_yield": 0.5, "empty_pair_yield": 0.5}
    same = select_pairs(rewards, request_index, 4, with_empty=True, pairing="same_prompts")
    assert same.prompts == [0] and same.counts["prompts_without_pair"] == 3
    # The same yields: they count the step's prompts with a pair per mode, kept or not.
    assert same.counts["trace_pair_yield"] == 0.5 and same.counts["empty_pair_yield"] == 0.5
    with pytest.raises(ValueError, match="pairing"):
        select_pairs(rewards, request_index, 4, with_empty=True, pairing="both")


def test_select_pairs_counts_an_empty_tie_and_drops_the_prompt():
    request_index = [0, 0, 1, 1]
    selection = select_pairs([1, 0, 0, 0], request_index, 1, with_empty=True)
    assert selection.prompts == [] and selection.counts["empty_ties"] == 1 and selection.counts["trace_ties"] == 0


def test_resamples_are_reward_ordered_and_seeded():
    rewards = [1, 0, 1, 0, 0.5]
    pairs = random_ordered_pairs(rewards, [0, 1, 2, 3, 4], 50, random.Random(3))
    assert all(rewards[i] > rewards[j] for i, j in pairs)
    assert {pair for pair in pairs} == {(i, j) for i in range(5) for j in range(5) if rewards[i] > rewards[j]}
    assert pairs == random_ordered_pairs(rewards, [0, 1, 2, 3, 4], 50, random.Random(3))
    selection = select_pairs(rewards + [1, 0], [0] * 5 + [1, 1], 1, with_empty=True, resamples=4, seed=1)
    assert len(selection.trace_resamples) == 1 and len(selection.trace_resamples[0]) == 4


def test_pairs_from_rollout_carry_the_sampled_tokens():
    rollout = Rollout(request_index=[0, 0, 1, 1], prompt_token_ids=[[1, 2], [1, 2], [1, 3], [1, 3]],
                      completion_token_ids=[[5, 9], [6, 9], [7, 9], [8]], behaviour_logprobs=[None] * 4,
                      completion_texts=[""] * 4, finished=[True] * 4, weight_versions=[0] * 4)
    selection = select_pairs([1, 0, 0, 1], rollout.request_index, 1, with_empty=True, resamples=2)
    (pair,) = pairs_from_rollout(rollout, selection, first_pair_id=100)
    assert pair.pair_id == 100
    assert (pair.trace_prompt, pair.trace_chosen, pair.trace_rejected) == ([1, 2], [5, 9], [6, 9])
    assert (pair.empty_prompt, pair.empty_chosen, pair.empty_rejected) == ([1, 3], [8], [7, 9])
    assert pair.trace_resamples == [([5, 9], [6, 9])] * 2

    # per_term: a prompt with a reasoning-off pair only carries no trace tokens (and no resamples).
    only_empty = select_pairs([1, 1, 0, 1], rollout.request_index, 1, with_empty=True, resamples=2, pairing="per_term")
    (pair,) = pairs_from_rollout(rollout, only_empty, first_pair_id=7)
    assert (pair.trace_prompt, pair.trace_chosen, pair.trace_rejected, pair.trace_resamples) == (None, None, None, [])
    assert (pair.empty_prompt, pair.empty_chosen, pair.empty_rejected) == ([1, 3], [8], [7, 9])


# -- tokenization with the chat template's thinking switch (§BVPO.2) ------------------------------

def test_tokenize_row_renders_reasoning_on_and_off():
    from rl_service.models.loading import load_tokenizer

    tokenizer = load_tokenizer("builtin")
    pair = tokenize_row(tokenizer, load_preference_file(REPO / "configs" / "data" / "bvpo_offline.jsonl").rows[0])
    on, off = tokenizer.decode(pair.trace_prompt), tokenizer.decode(pair.empty_prompt)
    assert on.endswith("<|im_start|>assistant\n") and off == on + "<think>\n\n</think>\n\n"
    for completion in (pair.trace_chosen, pair.trace_rejected, pair.empty_chosen, pair.empty_rejected):
        assert completion[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(pair.trace_chosen).startswith("<think>\n")
    trace_only = tokenize_row(tokenizer, load_preference_file(REPO / "configs" / "data" / "bvpo_offline.jsonl").rows[0],
                              with_empty=False)
    assert trace_only.empty_prompt is None and trace_only.trace_chosen == pair.trace_chosen


# -- the bundled dataset ---------------------------------------------------------------------------

def test_bundled_dataset_is_reproducible_clean_and_correctly_ranked(tmp_path):
    from rl_service.data.arithmetic import make_arithmetic_split
    from rl_service.rewards.verifiers import verify_integer

    out = tmp_path / "again.jsonl"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_bvpo_dataset.py"), "--out", str(out)], check=True,
                   capture_output=True)
    bundled = REPO / "configs" / "data" / "bvpo_offline.jsonl"
    assert out.read_bytes() == bundled.read_bytes()
    dataset = load_preference_file(bundled, on_bad_row="error")
    assert len(dataset.rows) == 256
    _, held_out = make_arithmetic_split(0, 0, 128, [1, 2, 3, 4, 5])   # configs/bvpo_offline.yaml's eval split
    assert not {row.prompt for row in dataset.rows} & {problem.question for problem in held_out}
    for row in dataset.rows:
        assert verify_integer(row.trace_chosen, row.answer) == verify_integer(row.empty_chosen, row.answer) == 1.0
        assert verify_integer(row.trace_rejected, row.answer) == verify_integer(row.empty_rejected, row.answer) == 0.0


# -- config: the preference section ------------------------------------------------------------------

@pytest.mark.parametrize("overrides, expected", [
    (["algorithm.name=bvpo", "preference.alpha=1.5"], "preference.alpha: Input should be less than or equal to 1"),
    (["algorithm.name=bvpo", "preference.alpha=-0.1"], "preference.alpha: Input should be greater than or equal to 0"),
    (["algorithm.name=bvpo", "preference.mode=offline"], "preference.dataset_path is required"),
    (["algorithm.name=bvpo", "preference.reward_source=reward_model"], "preference.reward_model_path is required"),
    (["algorithm.name=dpo", "preference.alpha_mode=online"], "preference.alpha_mode 'online' needs"),
    (["algorithm.name=bvpo", "preference.alpha_min=0.8", "preference.alpha_max=0.2"], "preference.alpha_min (0.8)"),
    (["algorithm.name=bvpo", "preference.betta=1"], "preference.betta: unknown key"),
    (["algorithm.name=bvpo", "generator.samples_per_prompt=1"], "samples_per_prompt must be >= 2 for online dpo/bvpo"),
])
def test_bad_preference_config_names_the_field(overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert expected in str(error.value)


@pytest.mark.parametrize("overrides, expected", [
    # 2 samples give one reward-ordered pair: K resamples of it are identical, tr Σ̂_t = 0, α̂ = 1.
    (["preference.alpha_mode=online", "generator.samples_per_prompt=2"],
     "generator.samples_per_prompt (2) must be >= 3 with preference.alpha_mode=online"),
    (["algorithm.name=dpo", "preference.off_samples_per_prompt=4"], "preference.off_samples_per_prompt applies to online bvpo"),
])
def test_preference_sampling_that_cannot_work_is_refused_at_load_time(overrides, expected):
    from rl_service.driver import prepare_job

    with pytest.raises(ConfigError) as error:
        load_config(REPO / "configs" / "bvpo.yaml", overrides)
    assert expected in str(error.value) and "\n" not in str(error.value)
    job = prepare_job(load_config(REPO / "configs" / "bvpo.yaml", ["preference.alpha_mode=online",
                                                                   "generator.samples_per_prompt=3",
                                                                   "preference.off_samples_per_prompt=12"]))
    assert job.config.preference.off_samples_per_prompt == 12


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rl_service.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_cli_reports_bad_rows_and_alpha_in_one_line_with_exit_2(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [_line(), _line(id=3, trace_rejected=GOOD["trace_chosen"])])
    result = _cli("validate", "configs/bvpo_offline.yaml", "--set", f"preference.dataset_path={bad}",
                  "--set", "preference.on_bad_row=error")
    lines = [line for line in result.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(lines) == 1 and f"{bad}:2: trace_chosen and trace_rejected are identical" in lines[0], result.stderr
    result = _cli("validate", "configs/bvpo.yaml", "--set", "preference.alpha=2")
    assert result.returncode == 2 and "preference.alpha: Input should be less than or equal to 1" in result.stderr
    result = _cli("validate", "configs/bvpo.yaml", "--set", "preference.alpha_mode=online",
                  "--set", "generator.samples_per_prompt=2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "generator.samples_per_prompt (2) must be >= 3 with preference.alpha_mode=online" in result.stderr
    skipped = _cli("validate", "configs/bvpo_offline.yaml", "--set", f"preference.dataset_path={bad}",
                   "--set", "data.prompts_per_step=1")   # one usable row: a batch lists each row once
    assert skipped.returncode == 0 and "1 train prompts" in skipped.stdout and f"{bad}:2" in skipped.stderr


def test_bvpo_refuses_a_chat_template_without_a_thinking_switch(tmp_path):
    from rl_service.driver import prepare_job
    from rl_service.errors import ModelLoadError

    model = tmp_path / "model"
    shutil.copytree(REPO / "rl_service" / "models" / "builtin", model)
    template = (model / "chat_template.jinja").read_text()
    switch = "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    assert switch in template
    (model / "chat_template.jinja").write_text(template.replace(switch, ""))
    with pytest.raises(ModelLoadError, match="has no enable_thinking switch"):
        prepare_job(load_config(REPO / "configs" / "bvpo.yaml", [f"model.path={model}"]))
    job = prepare_job(load_config(REPO / "configs" / "dpo.yaml", [f"model.path={model}"]))  # trace-only needs none
    assert len(job.task.train) == 4096
