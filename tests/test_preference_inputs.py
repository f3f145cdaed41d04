"""What a DPO / BVPO job accepts as input, checked before Ray starts: offline rows hold the fields the
algorithm trains on (trace-only dpo: no reasoning-off pair), TRL's `prompt, chosen, rejected` format
(strings or conversational), and a reward model directory that holds a trained classification head."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rl_service.config import load_config
from rl_service.data.preferences import PreferenceRow, load_preference_file
from rl_service.driver import prepare_job
from rl_service.errors import DataError, ModelLoadError

REPO = Path(__file__).resolve().parents[1]
BUILTIN = REPO / "rl_service" / "models" / "builtin"
PROMPT = "What is 3 + 4?"
TRACE = {"trace_chosen": "<think>\n3+4=7.\n</think>\n\n7", "trace_rejected": "<think>\n3+4=8.\n</think>\n\n8"}
EMPTY = {"empty_chosen": "7", "empty_rejected": "8"}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# -- offline rows: the fields the algorithm trains on ----------------------------------------------

def test_dpo_rows_need_no_reasoning_off_pair_but_bvpo_rows_do(tmp_path):
    path = _write(tmp_path / "trace_only.jsonl", [{"prompt": PROMPT, "answer": "7", **TRACE}])
    dataset = load_preference_file(path, with_empty=False)
    assert dataset.rows == [PreferenceRow(0, PROMPT, "7", TRACE["trace_chosen"], TRACE["trace_rejected"])]
    with pytest.raises(DataError) as error:
        load_preference_file(path, on_bad_row="error", with_empty=True)
    assert str(error.value) == (f"{path}:1: missing field 'empty_chosen' (preference.on_bad_row=error); a bvpo row "
                                "holds prompt, trace_chosen, trace_rejected (or chosen, rejected), empty_chosen, "
                                "empty_rejected; id and answer are optional")


def test_dpo_offline_job_prepares_from_trace_only_rows_without_answers(tmp_path):
    path = _write(tmp_path / "trace_only.jsonl", [{"prompt": f"What is {k} + 4?", **TRACE} for k in range(16)])
    job = prepare_job(load_config(REPO / "configs" / "dpo.yaml",
                                  ["preference.mode=offline", f"preference.dataset_path={path}",
                                   "preference.on_bad_row=error"]))
    assert len(job.dataset.rows) == 16 and job.dataset.rows[0].empty_chosen is None


# -- TRL's format ------------------------------------------------------------------------------------

def test_trl_chosen_rejected_rows_are_the_trace_pair(tmp_path):
    chat = {"prompt": [{"role": "user", "content": PROMPT}],
            "chosen": [{"role": "assistant", "content": "7"}], "rejected": [{"role": "assistant", "content": "8"}]}
    path = _write(tmp_path / "trl.jsonl", [{"prompt": PROMPT, "chosen": "7", "rejected": "8"}, {"id": 5, **chat},
                                           {"prompt": PROMPT, "chosen": "7", "trace_chosen": "7", "rejected": "8"}])
    rows = load_preference_file(path, on_bad_row="error", with_empty=False).rows
    assert rows == [PreferenceRow(0, PROMPT, None, "7", "8"), PreferenceRow(5, PROMPT, None, "7", "8"),
                    PreferenceRow(2, PROMPT, None, "7", "8")]
    both = _write(tmp_path / "bvpo.jsonl", [{"prompt": PROMPT, "chosen": "7", "rejected": "8", **EMPTY}])
    assert load_preference_file(both, with_empty=True).rows == [PreferenceRow(0, PROMPT, None, "7", "8", "7", "8")]


DPO_FIELDS = "a dpo row holds prompt, chosen, rejected (or trace_chosen, trace_rejected); id and answer are optional"


@pytest.mark.parametrize("row, why", [
    ({"prompt": PROMPT, "chosen": "7"}, f"missing field 'rejected' (preference.on_bad_row=error); {DPO_FIELDS}"),
    ({"prompt": PROMPT}, f"missing field 'chosen' (preference.on_bad_row=error); {DPO_FIELDS}"),
    ({"prompt": PROMPT, "trace_chosen": "7"}, f"missing field 'trace_rejected' (preference.on_bad_row=error); {DPO_FIELDS}"),
    ({"prompt": PROMPT, "chosen": "7", "trace_chosen": "9", "rejected": "8"},
     "fields 'trace_chosen' and 'chosen' name the same completion but differ: keep one of them"),
    ({"prompt": PROMPT, "chosen": "7", "rejected": "7"}, "chosen and rejected are identical"),
    ({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}],
      "chosen": "7", "rejected": "8"}, "field 'prompt' must be a string or one user message"),
])
def test_a_bad_trl_row_names_its_line_and_the_accepted_fields(tmp_path, row, why):
    path = _write(tmp_path / "trl.jsonl", [{"prompt": PROMPT, "chosen": "7", "rejected": "8"}, row])
    with pytest.raises(DataError) as error:
        load_preference_file(path, on_bad_row="error", with_empty=False)
    assert str(error.value).startswith(f"{path}:2: {why}"), str(error.value)
    skipped = load_preference_file(path, with_empty=False)   # skipped: the same reason, listed with its line
    assert skipped.num_skipped == 1 and skipped.bad_rows[0].startswith(f"{path}:2: {why.split(' (preference')[0]}")


def test_a_file_of_only_bad_rows_says_why_in_its_one_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": PROMPT, "good": "7", "bad": "8"}])
    with pytest.raises(DataError, match=f"no usable preference rows \\(1 bad\\); first: {path}:1: missing field 'chosen'; a dpo row"):
        load_preference_file(path, with_empty=False)


# -- the reward model: a trained classification head -----------------------------------------------

def _tiny_classifier(directory: Path, drop_head: bool = False) -> Path:
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    config = Qwen2Config(vocab_size=308, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=16, num_labels=1, pad_token_id=0,
                         max_position_embeddings=256)
    Qwen2ForSequenceClassification(config).save_pretrained(str(directory), safe_serialization=True)
    if drop_head:   # a classifier config over weights saved without their head
        tensors = load_file(str(directory / "model.safetensors"))
        del tensors["score.weight"]
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(BUILTIN / name, directory / name)
    return directory


def _prepare_with_reward_model(path: Path):
    return prepare_job(load_config(REPO / "configs" / "dpo.yaml", [
        "data.arithmetic.num_train=64", "preference.reward_source=reward_model", f"preference.reward_model_path={path}"]))


def test_a_causal_lm_is_refused_as_reward_model_before_ray(tmp_path):
    causal = tmp_path / "causal"
    shutil.copytree(BUILTIN, causal)   # what a run's checkpoints/step_N/model holds: a Qwen2ForCausalLM
    with pytest.raises(ModelLoadError, match="^preference.reward_model_path: .* is a Qwen2ForCausalLM checkpoint, "
                                             "not a reward model: config.json's architectures must name a "
                                             "\\*ForSequenceClassification class"):
        _prepare_with_reward_model(causal)


def test_a_classifier_without_its_saved_head_is_refused_and_a_whole_one_prepares(tmp_path):
    with pytest.raises(ModelLoadError, match="^preference.reward_model_path: .* holds no score.weight, the "
                                             "classification head of Qwen2ForSequenceClassification"):
        _prepare_with_reward_model(_tiny_classifier(tmp_path / "headless", drop_head=True))
    whole = _tiny_classifier(tmp_path / "whole")
    assert _prepare_with_reward_model(whole).config.preference.reward_model_path == str(whole)
