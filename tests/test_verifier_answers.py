"""The integer verifier reads the gold answer as it reads the completion, and a dataset whose gold
answer it can never match is refused at load, naming the row."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rl_service.config import load_config
from rl_service.errors import DataError
from rl_service.rewards.verifiers import parse_integer, verify_integer
from rl_service.tasks import load_task

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("completion, answer", [
    ("</think>1234", "1,234"),     # the gold writes the thousands separator
    ("</think>1,234", "1234"),     # the completion does
    ("</think>+7", "7"), ("</think>7", "+7"), ("</think>007", "7"), ("</think> -3 ", " -3"),
])
def test_equal_integers_match_whichever_side_writes_them_how(completion, answer):
    assert verify_integer(completion, answer) == 1.0


@pytest.mark.parametrize("completion, answer", [
    ("</think>1234", "1235"), ("</think>1234.0", "1234"), ("</think>12 34", "1234"), ("</think>seven", "seven"),
])
def test_other_texts_do_not_match(completion, answer):
    assert verify_integer(completion, answer) == 0.0


def test_parse_integer_reads_one_integer_only():
    assert [parse_integer(text) for text in ("1,234", " +5 ", "-0", "7.0", "seven", "")] == [1234, 5, 0, None, None, None]


def _rows(path: Path, answers: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": f"q{index}?", "answer": answer}) + "\n"
                            for index, answer in enumerate(answers)))
    return path


def test_a_jsonl_gold_answer_the_integer_verifier_cannot_read_is_refused_naming_the_line(tmp_path):
    train = _rows(tmp_path / "train.jsonl", ["7", 12, "1,234", "seven"])
    config = load_config(REPO / "configs" / "quickstart.yaml",
                         ["data.source=jsonl", f"data.train_path={train}", "reward.verifier=integer"])
    with pytest.raises(DataError, match=r"train\.jsonl:4: field 'answer' is 'seven', not an integer; reward.verifier"):
        load_task(config)
    # math reads words and expressions: the same file loads.
    config = load_config(REPO / "configs" / "quickstart.yaml",
                         ["data.source=jsonl", f"data.train_path={train}", "reward.verifier=math"])
    assert [record.answer for record in load_task(config).train] == ["7", "12", "1,234", "seven"]
    # A custom reward scores the train split in the verifier's place: its answers are not the verifier's to refuse.
    reward = tmp_path / "rubric.py"
    reward.write_text("def reward(completion, answer):\n    return float(answer in completion)\n")
    config = load_config(REPO / "configs" / "quickstart.yaml",
                         ["data.source=jsonl", f"data.train_path={train}", "reward.verifier=integer",
                          f"reward.custom={reward}:reward", "reward.custom_sandbox=off"])
    assert [record.answer for record in load_task(config).train][-1] == "seven"


def test_an_hf_gold_answer_the_integer_verifier_cannot_read_is_refused_naming_the_row(tmp_path):
    dataset = tmp_path / "hf"
    _rows(dataset / "train.jsonl", ["1", "2"])
    _rows(dataset / "test.jsonl", ["3", "seven"])
    config = load_config(REPO / "configs" / "quickstart.yaml",
                         ["data.source=hf", f"data.hf.path={dataset}", "data.hf.eval_split=test", "reward.verifier=integer"])
    with pytest.raises(DataError, match=r"\[test\]: row 1: field 'answer' is 'seven', not an integer"):
        load_task(config)


def test_a_relative_dataset_path_not_found_says_where_it_was_looked_up(tmp_path, monkeypatch):
    # configs/jsonl_example.yaml names configs/data/…: run from elsewhere, the message says why it is missing.
    monkeypatch.chdir(tmp_path)
    config = load_config(REPO / "configs" / "jsonl_example.yaml")
    with pytest.raises(DataError) as error:
        load_task(config)
    assert str(error.value) == (f"{Path(config.data.train_path)}: dataset file not found (a relative path, looked up "
                                f"in the current directory {tmp_path})")


def test_a_relative_preference_dataset_not_found_says_where_it_was_looked_up(tmp_path, monkeypatch):
    from rl_service.data.preferences import load_preference_file

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as error:
        load_preference_file("pairs/missing.jsonl")
    assert str(error.value).endswith(
        f"pairs/missing.jsonl: dataset file not found (a relative path, looked up in the current directory {tmp_path})")
