"""`data.source: hf`: datasets the tests build and save (save_to_disk, a data-file directory), the
column mapping, chat prompts through the chat template, the one-line errors, and a real run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rl_service.errors import DataError

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "Answer with the number only."


def _chat(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


@pytest.fixture(scope="module")
def saved_dict(tmp_path_factory) -> Path:
    """A DatasetDict (train / validation) saved with save_to_disk: chat prompts, custom columns and ids."""
    import datasets

    from rl_service.data.arithmetic import make_arithmetic_split

    train, held_out = make_arithmetic_split(seed=3, num_train=12, num_eval=4, levels=[1, 2])

    def table(problems, offset):
        return datasets.Dataset.from_dict({
            "uid": [offset + p.prompt_id for p in problems], "conversation": [_chat(p.question) for p in problems],
            "question": [p.question for p in problems], "final": [int(p.answer) for p in problems]})

    path = tmp_path_factory.mktemp("hf") / "arith"
    datasets.DatasetDict({"train": table(train, 1000), "validation": table(held_out, 5000)}).save_to_disk(str(path))
    return path


def _config(extra: list[str]):
    from rl_service.config import load_config

    return load_config(REPO / "configs" / "quickstart.yaml", ["data.source=hf", "reward.verifier=integer", *extra])


def test_save_to_disk_dict_with_column_mapping_and_chat_prompts(saved_dict):
    import datasets

    from rl_service.models.loading import load_tokenizer
    from rl_service.tasks import PromptTokenizer, load_task

    config = _config([f"data.hf.path={saved_dict}", "data.hf.eval_split=validation", "data.hf.id_column=uid",
                      "data.hf.prompt_column=conversation", "data.hf.answer_column=final"])
    task = load_task(config)
    reference = datasets.load_from_disk(str(saved_dict))
    assert [(r.prompt_id, r.prompt, r.answer) for r in task.train] == [
        (row["uid"], row["question"], str(row["final"])) for row in reference["train"]]
    assert [r.prompt_id for r in task.eval] == reference["validation"]["uid"]
    assert task.train[0].messages == (("system", SYSTEM), ("user", reference["train"][0]["question"]))
    # The chat goes through the model's template whole, system message included.
    tokenizer = load_tokenizer("builtin", False)
    expected = tokenizer.apply_chat_template(reference["train"][0]["conversation"], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=True)
    assert SYSTEM in expected
    tokens = PromptTokenizer(tokenizer, thinking=True)(task.train[0])
    assert tokens == tokenizer(expected, add_special_tokens=False)["input_ids"]

    # A string prompt column of the same dataset: the user message alone, ids from the row index.
    plain = load_task(_config([f"data.hf.path={saved_dict}", "data.hf.prompt_column=question",
                               "data.hf.answer_column=final"]))
    assert [r.prompt_id for r in plain.train] == list(range(12)) and plain.train[0].messages is None
    assert plain.eval == []


def test_local_data_file_directory(tmp_path):
    import datasets

    directory = tmp_path / "files"
    directory.mkdir()
    for split, rows in (("train", [("What is 2 + 2?", 4), ("What is 3 + 5?", 8)]), ("test", [("What is 1 + 6?", 7)])):
        datasets.Dataset.from_dict({"q": [q for q, _ in rows], "a": [a for _, a in rows]}).to_parquet(
            str(directory / f"{split}.parquet"))
    from rl_service.tasks import load_task

    task = load_task(_config([f"data.hf.path={directory}", "data.hf.eval_split=test", "data.hf.prompt_column=q",
                              "data.hf.answer_column=a"]))
    assert [(r.prompt, r.answer) for r in task.train] == [("What is 2 + 2?", "4"), ("What is 3 + 5?", "8")]
    assert [(r.prompt, r.answer) for r in task.eval] == [("What is 1 + 6?", "7")]


def test_group_column_names_each_prompts_group_for_eval_and_gvm(tmp_path):
    import datasets

    from rl_service.tasks import load_task

    directory = tmp_path / "levels"
    directory.mkdir()
    for split, rows in (("train", [("What is 2 + 2?", 4, "Level 1"), ("What is 13 * 7?", 91, "Level 3")]),
                        ("test", [("What is 1 + 6?", 7, "Level 1")])):
        datasets.Dataset.from_dict({"prompt": [q for q, _, _ in rows], "answer": [a for _, a, _ in rows],
                                    "level": [g for _, _, g in rows]}).to_parquet(str(directory / f"{split}.parquet"))
    extra = [f"data.hf.path={directory}", "data.hf.eval_split=test", "statistics.allocation=gvm",
             "statistics.unseen_prompts=group"]
    with pytest.raises(Exception, match="set data.hf.group_column"):
        _config(extra)
    task = load_task(_config([*extra, "data.hf.group_column=level"]))
    assert [r.group for r in task.train] == ["Level 1", "Level 3"]
    assert task.eval_groups == {0: "Level 1"}   # eval accuracy is reported per group
    with pytest.raises(DataError, match=r"no column 'difficulty' \(data.hf.group_column\)"):
        load_task(_config([f"data.hf.path={directory}", "data.hf.group_column=difficulty"]))


def test_errors_name_the_dataset_split_and_row(tmp_path, saved_dict):
    import datasets

    from rl_service.tasks import load_task

    single = tmp_path / "single"
    datasets.Dataset.from_dict({"prompt": ["What is 1 + 1?"], "answer": ["2"]}).save_to_disk(str(single))
    with pytest.raises(DataError, match=r"single: holds one split .* data.hf.eval_split 'test' names nothing"):
        load_task(_config([f"data.hf.path={single}", "data.hf.eval_split=test"]))
    blank = tmp_path / "blank"
    datasets.Dataset.from_dict({"prompt": ["What is 1 + 1?", "  "], "answer": ["2", "3"]}).save_to_disk(str(blank))
    with pytest.raises(DataError, match=r"blank \[train\]: row 1: field 'prompt' must be a non-empty string"):
        load_task(_config([f"data.hf.path={blank}"]))
    with pytest.raises(DataError, match=r"arith: no split 'test' \(data.hf.eval_split\); it has train, validation"):
        load_task(_config([f"data.hf.path={saved_dict}", "data.hf.eval_split=test", "data.hf.prompt_column=question",
                           "data.hf.answer_column=final"]))
    with pytest.raises(DataError, match=r"\[train\]: no column 'answer' \(data.hf.answer_column\); it has uid, "
                                        "conversation, question, final"):
        load_task(_config([f"data.hf.path={saved_dict}", "data.hf.prompt_column=question"]))
    duplicate = tmp_path / "duplicate"
    datasets.Dataset.from_dict({"prompt": ["a?", "b?"], "answer": ["1", "2"], "k": [7, 7]}).save_to_disk(str(duplicate))
    with pytest.raises(DataError, match=r"duplicate \[train\]: row 1: duplicate id 7 \(first at .*row 0\)"):
        load_task(_config([f"data.hf.path={duplicate}", "data.hf.id_column=k"]))
    bad_chat = tmp_path / "bad_chat"
    datasets.Dataset.from_dict({"prompt": [[{"role": "robot", "content": "hi"}]], "answer": ["1"]}).save_to_disk(
        str(bad_chat))
    with pytest.raises(DataError, match=r"row 0: field 'prompt' message 0 has role 'robot'"):
        load_task(_config([f"data.hf.path={bad_chat}"]))


def test_a_bad_json_lines_record_in_a_data_file_directory_is_named_by_file_and_line(tmp_path):
    from rl_service.tasks import load_task

    files = tmp_path / "files"
    files.mkdir()
    (files / "train.jsonl").write_text('{"prompt": "1+1?", "answer": "2"}\n\n{"prompt": "x", answer: 3}\n')
    # datasets says only "An error occurred while generating the dataset".
    with pytest.raises(DataError, match=r"train.jsonl:3: not valid JSON \(Expecting property name"):
        load_task(_config([f"data.hf.path={files}"]))


def test_chat_prompts_in_jsonl_too(tmp_path):
    from rl_service.data.prompts import load_prompt_file

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": _chat("What is 1 + 2?"), "answer": 3}) + "\n"
                    + json.dumps({"prompt": [], "answer": 1}) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:2: field 'prompt' is an empty list of messages"):
        load_prompt_file(path)


def test_example_config_loads():
    from rl_service.config import load_config
    from rl_service.tasks import load_task

    task = load_task(load_config(REPO / "configs" / "hf_dataset.yaml"))
    assert len(task.train) == 64 and len(task.eval) == 32
    # User-only chats: the built-in model was never trained on a system turn and scores 0 with one.
    assert task.train[0].messages == (("user", "What is 33 + 80?"),)
    assert all(len(record.messages) == 1 for record in task.train + task.eval)


def test_real_run_on_a_saved_dataset(tmp_path, saved_dict):
    from conftest import read_metrics, run_short_job

    summary = run_short_job(tmp_path / "run", [
        "data.source=hf", f"data.hf.path={saved_dict}", "data.hf.eval_split=validation", "data.hf.id_column=uid",
        "data.hf.prompt_column=conversation", "data.hf.answer_column=final", "reward.verifier=integer"], steps=1)
    assert summary["steps"] == 1
    evals = [row for row in read_metrics(tmp_path / "run") if "eval_accuracy" in row]
    assert [row["step"] for row in evals] == [0, 1]
    ledger = [json.loads(line) for line in (tmp_path / "run" / "ledger.jsonl").read_text().splitlines()]
    assert all(1000 <= prompt_id < 1012 for row in ledger for prompt_id in row["prompt_ids"])   # the uid column


@pytest.mark.parametrize("message, about_the_split", [
    ("Unknown split \"test\". Should be one of ['train'].", True),
    ("Bad split: test. Available splits: ['train']", True),
    ("Couldn't cast /data/splits/train-0.parquet: column 'answer' has type null", False),
    ("An error occurred reading /home/me/split_data/x.arrow", False),
    ("Couldn't cast\nprompt: string\nsplit: string\nto the features", False),   # a column named split
    ("cannot read my_splits", False),                                           # a relative path, no '/'
])
def test_only_an_error_about_the_split_blames_the_split(message, about_the_split):
    from rl_service.data.hf_datasets import names_a_split

    assert names_a_split(message) == about_the_split
