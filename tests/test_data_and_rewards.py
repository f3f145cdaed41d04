"""Prompt files, the data cursor, verifiers and request sharding (pure code, no Ray)."""
import json

import pytest

from rl_service.data.prompts import load_prompt_file
from rl_service.data.sampler import PromptSampler
from rl_service.errors import DataError
from rl_service.rewards.verifiers import final_answer_text, score_batch, verify_integer, verify_math
from rl_service.rollout import GenerationRequest, balance_requests


def _write_jsonl(path, rows):
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return path


def test_jsonl_ids_default_to_line_index_and_explicit_ids_win(tmp_path):
    records = load_prompt_file(_write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?", "answer": 4}]))
    assert [(r.prompt_id, r.answer) for r in records] == [(0, "2"), (1, "4")]
    records = load_prompt_file(_write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a", "answer": "1", "id": 40}]))
    assert records[0].prompt_id == 40


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "x", "answer": "1"}, "{not json"], r"d\.jsonl:2: not valid JSON"),
    ([{"prompt": "x"}], r"d\.jsonl:1: missing field 'answer'"),
    ([{"prompt": "", "answer": "1"}], r"d\.jsonl:1: field 'prompt' must be a non-empty string"),
    ([{"prompt": "x", "answer": None}], r"d\.jsonl:1: field 'answer'"),
    ([{"prompt": "x", "answer": "1", "id": -3}], r"d\.jsonl:1: field 'id'"),
    ([{"prompt": "x", "answer": "1", "id": 5}, {"prompt": "y", "answer": "2", "id": 5}], r"d\.jsonl:2: duplicate id 5"),
    (["[1, 2]"], r"d\.jsonl:1: expected an object"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        load_prompt_file(_write_jsonl(tmp_path / "d.jsonl", rows))


def test_missing_empty_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_prompt_file(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        load_prompt_file(tmp_path / "empty.jsonl")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported dataset format"):
        load_prompt_file(tmp_path / "data.txt")


def test_csv_reads_records_in_order(tmp_path):
    (tmp_path / "d.csv").write_text("prompt,answer\nWhat is 2+3?,5\nWhat is 4*4?,16\n")
    records = load_prompt_file(tmp_path / "d.csv")
    assert [(r.prompt_id, r.prompt, r.answer) for r in records] == [(0, "What is 2+3?", "5"), (1, "What is 4*4?", "16")]


def test_a_field_written_twice_in_a_json_record_is_named(tmp_path):
    # json keeps the last value: a record with "answer" twice trained on one of them silently.
    (tmp_path / "d.jsonl").write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?", "answer": "4", "answer": "5"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'answer' appears twice in the record$"):
        load_prompt_file(tmp_path / "d.jsonl")
    (tmp_path / "d.json").write_text('[{"prompt": "1+1?", "prompt": "2+2?", "answer": "4"}]')
    with pytest.raises(DataError, match=r"d\.json: field 'prompt' appears twice in one record of the array$"):
        load_prompt_file(tmp_path / "d.json")
    # JSON Lines in a .json file: the line is named, as in a .jsonl file.
    (tmp_path / "d.json").write_text('{"prompt": "a", "prompt": "b", "answer": "1"}\n{"prompt": "c", "answer": "2"}\n')
    with pytest.raises(DataError, match=r"d\.json:1: field 'prompt' appears twice in the record$"):
        load_prompt_file(tmp_path / "d.json")


def test_a_csv_field_past_the_csv_module_s_default_limit_is_read_as_written(tmp_path):
    # Past 131,072 characters the csv module refused the file and pandas read it, retyping answers.
    long_prompt = "x" * 200_000
    (tmp_path / "d.csv").write_text(f"prompt,answer\n{long_prompt},1.50\n")
    assert [(len(r.prompt), r.answer) for r in load_prompt_file(tmp_path / "d.csv")] == [(200_000, "1.50")]


def test_unnamed_csv_columns_are_left_out(tmp_path):
    # A spreadsheet export's trailing commas: columns without a name, two of them, no data.
    (tmp_path / "d.csv").write_text("prompt,answer,,\nWhat is 2+3?,5,,\n")
    assert [(r.prompt, r.answer) for r in load_prompt_file(tmp_path / "d.csv")] == [("What is 2+3?", "5")]


def test_csv_answers_are_the_text_in_the_file(tmp_path):
    # Read through pandas (datasets' csv reader) a column of numbers was typed: "1.50" became 1.5, "007"
    # 7, and with one decimal in the column "3" became "3.0"; "NA" was a missing value.
    (tmp_path / "d.csv").write_text("id,prompt,answer\n7,a?,1.50\n3,b?,007\n12,c?,3\n5,d?,NA\n")
    records = load_prompt_file(tmp_path / "d.csv")
    assert [(r.prompt_id, r.answer) for r in records] == [(7, "1.50"), (3, "007"), (12, "3"), (5, "NA")]


@pytest.mark.parametrize("text, message", [
    ('prompt,answer\n"1+1=",2\n"2+2=",4\n"3+3=",\n', r"d\.csv:4: field 'answer'"),   # the header is line 1
    # A quoted field spanning lines, and blank lines, still leave the next record's own line.
    ('prompt,answer\n"two\nlines",2\n\n"",3\n', r"d\.csv:5: field 'prompt' must be a non-empty string"),
    ("prompt,answer\r\n\"a\r\nb\",1\r\n\r\n,2\r\n", r"d\.csv:5: field 'prompt'"),
    ("prompt,answer,id\nx,1,5\ny,2,5\n", r"d\.csv:3: duplicate id 5 \(first at .*d\.csv:2\)"),
    ("question,answer\n1 + 1?,2\n", r"d\.csv:2: missing field 'prompt'"),
    ("prompt,answer\n", r"d\.csv: no records$"),     # only a header: as an empty .jsonl, not a library message
    ("prompt,answer\n\n\n", r"d\.csv: no records$"),
    ("", r"d\.csv: no records$"),
    # A record with more fields than the header, or a quote never closed: pandas' tokenizer refused them
    # and the message was datasets' "An error occurred while generating the dataset", no line.
    ("prompt,answer\nwhat is 1+1,2\nwhat is 2+2,4,extra\nwhat is 3+3,6\n",
     r"d\.csv:3: 3 fields, but the header has 2 \(a comma inside a field needs the field in double quotes\)$"),
    ('prompt,answer\nwhat is 1+1,2\n"unterminated,4\nwhat is 3+3,6\n', r"d\.csv:3: a double quote opened here is never closed$"),
    # Anything else the csv module refuses had fallen back to pandas, which retyped every answer again.
    ('prompt,answer\nwhat is 1+1,2\n"q"x,1\n', r"d\.csv:3: not CSV \(',' expected after '\"'\)$"),
    # dict(zip(header, row)) would keep the second 'answer' without a word (pandas had renamed it answer.1).
    ("prompt,answer,answer\nq?,1,2\n", r"d\.csv:1: the header names column 'answer' twice$"),
])
def test_bad_csv_names_file_and_line(tmp_path, text, message):
    (tmp_path / "d.csv").write_bytes(text.encode())
    with pytest.raises(DataError, match=message):
        load_prompt_file(tmp_path / "d.csv")


def test_sampler_covers_each_epoch_once_and_resumes_from_its_cursor():
    sampler = PromptSampler(num_prompts=10, batch_size=4, seed=3)
    first_epoch = [sampler.next_batch() for _ in range(2)] + [sampler.next_batch()[:2]]
    assert sorted(i for batch in first_epoch for i in batch) == list(range(10))
    state = sampler.state_dict()
    expected = [sampler.next_batch() for _ in range(5)]
    resumed = PromptSampler(num_prompts=10, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(5)] == expected
    other_seed = PromptSampler(num_prompts=10, batch_size=4, seed=4)
    assert [other_seed.next_batch() for _ in range(3)] != first_epoch


@pytest.mark.parametrize("completion, answer, expected", [
    ("<think>\n7+8=15\n</think>\n\n15", "15", 1.0),
    ("<think>\nthe answer is 15\n</think>\n\n14", "15", 0.0),   # the trace does not count
    ("15", "15", 1.0),
    ("-12", "-12", 1.0),
    ("015", "15", 1.0),
    ("15 16", "15", 0.0),
    ("", "0", 0.0),
    ("<think>\nunfinished", "3", 0.0),
])
def test_integer_verifier(completion, answer, expected):
    assert verify_integer(completion, answer) == expected


def test_math_verifier_accepts_equivalent_forms_and_rejects_wrong_ones():
    assert verify_math("<think>\nhalf\n</think>\n\n$\\frac{1}{2}$", "0.5") == 1.0
    assert verify_math("The answer is \\boxed{3}", "3") == 1.0
    assert verify_math("\\boxed{4}", "3") == 0.0
    assert verify_math("no number here", "3") == 0.0
    assert final_answer_text("<think>a</think> b </think> c") == "c"


def test_score_batch_checks_lengths_and_verifier_name():
    assert score_batch(["1", "2"], ["1", "3"], "integer") == [1.0, 0.0]
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        score_batch(["1", "2"], ["1"], "integer")
    with pytest.raises(ValueError, match="unknown verifier"):
        score_batch(["1"], ["1"], "regex")


def test_the_balancer_on_idle_engines_keeps_order_and_balances_samples():
    requests = [GenerationRequest(i, 100 + i, [1, 2], n) for i, n in enumerate([8, 8, 8, 8, 1, 15])]
    shards = [shard for _, shard in balance_requests(requests, [0, 0, 0])]
    flat = [request for shard in shards for request in shard]
    assert [r.request_index for r in flat] == list(range(6))
    loads = [sum(r.num_samples for r in shard) for shard in shards]
    assert max(loads) - min(loads) <= 15 and sum(loads) == 48
    assert len(balance_requests(requests[:1], [0, 0, 0, 0])) == 1


def test_a_check_past_its_time_limit_scores_0_and_is_counted():
    from rl_service.rewards.verifiers import score_batch_counted

    completions, answers = ["<think>2+2=4</think>4", "<think></think>5"], ["4", "4"]
    assert score_batch_counted(completions, answers, "integer", timeout_s=5.0) == ([1.0, 0.0], 0)
    assert score_batch_counted(completions, answers, "math", timeout_s=5.0) == ([1.0, 0.0], 0)
    # A limit no check can meet: the right answer too scores 0, and both calls are counted.
    assert score_batch_counted(completions, answers, "math", timeout_s=1e-9) == ([0.0, 0.0], 2)
