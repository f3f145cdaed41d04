"""Prompt datasets: a record is (prompt_id, user message or chat messages, gold answer).

Sources: the built-in arithmetic task, local files with `prompt` and `answer` fields — JSONL/JSON
and CSV read here record by record so an error names its file line (a CSV value is the text in the
file, never retyped), Parquet through HF `datasets` — or
a local Hugging Face dataset (data/hf_datasets.py). A prompt is a string (the user message) or a
chat: a list of {role, content} messages ending with the user's, rendered by the chat template.
Prompt ids are stable across restarts: an explicit integer `id` field, else the record's index
in the file; the statistics actor indexes its arrays by them.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rl_service.errors import DataError


@dataclass(frozen=True)
class PromptRecord:
    prompt_id: int
    prompt: str          # the user message (of a chat: its last one, for reward models and messages)
    answer: str
    messages: tuple[tuple[str, str], ...] | None = None   # a chat prompt: (role, content) in order
    group: str | None = None   # its group of alike prompts (a difficulty level), if the data names one


_ROLES = ("system", "user", "assistant")


def _chat_messages(value: list, where: str, field: str) -> tuple[tuple[str, str], ...]:
    """A chat prompt as (role, content) pairs; the last message is the user's (the model answers it)."""
    if not value:
        raise DataError(f"{where}: field '{field}' is an empty list of messages")
    messages = []
    for position, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: field '{field}' message {position} must be an object with string 'role' and "
                            "'content'")
        if message["role"] not in _ROLES:
            raise DataError(f"{where}: field '{field}' message {position} has role '{message['role']}' (use system, "
                            "user or assistant)")
        messages.append((message["role"], message["content"]))
    if messages[-1][0] != "user" or not messages[-1][1].strip():
        raise DataError(f"{where}: field '{field}' must end with a non-empty user message (the one to answer)")
    return tuple(messages)


_MAX_PROMPT_ID = 2**40  # statistics arrays are indexed by id; keep them addressable


def _record_from_row(row: object, where: str, index: int, prompt_field: str = "prompt", answer_field: str = "answer",
                     id_field: str | None = "id", group_field: str | None = None) -> PromptRecord:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with '{prompt_field}' and '{answer_field}', got {type(row).__name__}")
    for field in (prompt_field, answer_field):
        if field not in row:
            raise DataError(f"{where}: missing field '{field}'")
    prompt, answer = row[prompt_field], row[answer_field]
    is_chat = isinstance(prompt, list) and bool(prompt) and all(isinstance(message, dict) for message in prompt)
    messages = _chat_messages(prompt, where, prompt_field) if is_chat or prompt == [] else None
    if messages is not None:
        prompt = messages[-1][1]
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: field '{prompt_field}' must be a non-empty string or a list of chat messages")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or str(answer).strip() == "":
        raise DataError(f"{where}: field '{answer_field}' must be a non-empty string or number")
    if isinstance(answer, float) and not math.isfinite(answer):   # JSON's NaN / Infinity: would train against "nan"
        raise DataError(f"{where}: field '{answer_field}' is {answer}, not a finite number")
    texts = [(prompt_field, content) for _, content in messages] if messages else [(prompt_field, prompt)]
    for field, text in texts + [(answer_field, answer)]:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:   # a lone surrogate ("\ud800"): valid JSON, not text
                raise DataError(f"{where}: field '{field}' holds {text[exc.start]!r} at character {exc.start}, "
                                "a lone surrogate that is not text") from None
    prompt_id = row.get(id_field, index) if id_field is not None else index
    if isinstance(prompt_id, bool) or not isinstance(prompt_id, int) or not 0 <= prompt_id < _MAX_PROMPT_ID:
        raise DataError(f"{where}: field '{id_field}' must be an integer in [0, 2**40)")
    group = None
    if group_field is not None:
        group = row.get(group_field)
        if isinstance(group, bool) or not isinstance(group, (str, int)) or str(group).strip() == "":
            raise DataError(f"{where}: field '{group_field}' (the prompt's group) must be a non-empty string or an "
                            f"integer, got {group!r}")
        group = str(group).strip()
    return PromptRecord(prompt_id=prompt_id, prompt=prompt, answer=str(answer).strip(), messages=messages, group=group)


def _decode_utf8(data: bytes, where: str, first_line: int = 1) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + data.count(b"\n", 0, exc.start)
        raise DataError(f"{where}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8") from None


def read_data_file(path: Path, prefix: str = "") -> bytes:
    """The file's bytes; one that cannot be read (permissions) is a DataError naming it."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{prefix}{path}: cannot read ({exc.strerror or exc})") from None


class DuplicateKey(ValueError):
    """A JSON object with one key twice (the key is the message)."""


def _object_without_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    # json keeps the last of two equal keys: a record with "answer" twice trained on one of them silently.
    record = {}
    for key, value in pairs:
        if key in record:
            raise DuplicateKey(key)
        record[key] = value
    return record


def parse_json(text: str):
    """`json.loads`, refusing an object with one key twice (DuplicateKey)."""
    return json.loads(text, object_pairs_hook=_object_without_duplicate_keys)


def _read_json_rows(path: Path) -> list[tuple[object, str]]:
    """Rows of a JSON array, or of JSON Lines (also accepted in a .json file)."""
    data = read_data_file(path).removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark (Windows editors) is fine
    if path.suffix == ".json":
        text = _decode_utf8(data, str(path))
        try:
            document = parse_json(text)
        except DuplicateKey as exc:
            if text.lstrip().startswith("["):
                raise DataError(f"{path}: field '{exc}' appears twice in one record of the array") from None
            document = None  # JSON Lines in a .json file: read line by line below, which names the line
        except json.JSONDecodeError as exc:
            if text.lstrip().startswith("["):
                raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
            document = None  # not one JSON value: read it as JSON Lines below
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply (records are objects inside one array)") from None
        if isinstance(document, list):
            return [(row, f"{path}: record {k}") for k, row in enumerate(document)]
        if document is not None and not (isinstance(document, dict) and "prompt" in document):
            raise DataError(f"{path}: the top level is a JSON {type(document).__name__.replace('dict', 'object')}; "
                            "expected an array of records or one record per line")
    rows = []
    for line_number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        text = _decode_utf8(line, str(path), line_number)
        try:
            rows.append((parse_json(text), f"{path}:{line_number}"))
        except DuplicateKey as exc:
            raise DataError(f"{path}:{line_number}: field '{exc}' appears twice in the record") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_number}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise DataError(f"{path}:{line_number}: JSON nested too deeply (a record is one flat object)") from None
    return rows


def _csv_records(path: Path) -> list[tuple[dict, str]]:
    """The data records of a CSV file as (row, `file:line`), every value the text written in the file
    (an answer "1.50" or "007" stays that: pandas, under `datasets`, had made them 1.5 and 7, and "NA"
    a missing value), an integer `id` read as one. A quoted field may span lines, so a record is named
    by the line it starts on, as the csv module counts them. Blank lines are skipped. Anything the
    csv module refuses (a quote never closed, text after a closing quote), a record with more fields
    than the header, and a header naming a column twice are DataErrors naming the line."""
    import csv
    import io

    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))   # a long-context prompt is one field
    text = _decode_utf8(read_data_file(path).removeprefix(b"\xef\xbb\xbf"), str(path))
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)   # strict: a quote open at the end is an error
    records, header = [], None
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            if "unexpected end of data" in str(exc):
                raise DataError(f"{path}:{start}: a double quote opened here is never closed") from None
            raise DataError(f"{path}:{reader.line_num}: not CSV ({exc})") from None
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if header is None:
            header = [name.strip() for name in row]
            # Unnamed columns (trailing commas of a spreadsheet export) are left out of the records.
            twice = next((name for index, name in enumerate(header) if name and name in header[:index]), None)
            if twice is not None:   # one of the two columns would be dropped without a word
                raise DataError(f"{path}:{start}: the header names column '{twice}' twice")
            continue
        if len(row) > len(header):
            raise DataError(f"{path}:{start}: {len(row)} fields, but the header has {len(header)} (a comma inside a "
                            "field needs the field in double quotes)")
        # A short row lacks its last fields: named as missing by the caller.
        record = {name: value for name, value in zip(header, row) if name}
        if re.fullmatch(r"[0-9]+", record.get("id", "").strip()):
            record["id"] = int(record["id"])
        records.append((record, f"{path}:{start}"))
    return records


def _read_table_rows(path: Path) -> list[tuple[object, str]]:
    """Rows of a CSV or Parquet file. A CSV row is named by the file line it starts on (`file:line`, as
    JSON Lines are); a Parquet row by its 0-based index (`file: row k`, as JSON array records are)."""
    if path.suffix == ".csv":
        return _csv_records(path)   # [] for only a header, or nothing: "no records", as for the other formats
    import datasets  # Parquet only: its columns are typed in the file

    try:
        with _quiet_datasets():
            table = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types; the user needs the file and the reason
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"{path}: cannot read as parquet ({reason})") from None
    return [(row, f"{path}: row {k}") for k, row in enumerate(table)]


@contextmanager
def _quiet_datasets():
    """No progress bars or log lines from `datasets` while it reads a file: the CLI's output is ours
    (a bad file must end in one error line, not a logged error, a bar and then ours)."""
    from datasets.utils import logging as datasets_logging

    bars_were_on = datasets_logging.is_progress_bar_enabled()
    level = datasets_logging.get_verbosity()
    datasets_logging.disable_progress_bar()
    datasets_logging.set_verbosity(logging.CRITICAL + 1)
    try:
        yield
    finally:
        datasets_logging.set_verbosity(level)
        if bars_were_on:
            datasets_logging.enable_progress_bar()


def looked_up_where(file: Path) -> str:
    """A relative path is read from the working directory, not the config file's: say which, since
    the same job run from elsewhere fails on it."""
    return "" if Path(file).is_absolute() else f" (a relative path, looked up in the current directory {os.getcwd()})"


def load_prompt_file(path: str | Path, group_field: str | None = None,
                     integer_answers: bool = False) -> list[PromptRecord]:
    """Read prompts with answers (and, with `group_field`, each one's group) from a .jsonl/.json/.csv/.parquet
    file; errors name file and line."""
    file = Path(path)
    try:
        is_dir, is_file = file.is_dir(), file.is_file()
    except OSError as exc:   # a directory above it that cannot be entered
        raise DataError(f"{file}: cannot read ({exc.strerror or exc})") from None
    if is_dir:
        raise DataError(f"{file}: is a directory, not a dataset file")
    if not is_file:
        raise DataError(f"{file}: dataset file not found{looked_up_where(file)}")
    if file.suffix in (".jsonl", ".json"):
        rows = _read_json_rows(file)
    elif file.suffix in (".csv", ".parquet"):
        rows = _read_table_rows(file)
    else:
        raise DataError(f"{file}: unsupported dataset format '{file.suffix}' (use .jsonl, .json, .csv or .parquet)")
    return records_from_rows(rows, str(file), group_field=group_field, integer_answers=integer_answers)


def records_from_rows(rows: list[tuple[object, str]], source: str, prompt_field: str = "prompt",
                      answer_field: str = "answer", id_field: str | None = "id",
                      group_field: str | None = None, integer_answers: bool = False) -> list[PromptRecord]:
    """Prompt records of (row, where) pairs; every error names its row; ids must be unique.
    `integer_answers` (reward.verifier: integer): every gold answer must read as an integer."""
    records = [_record_from_row(row, where, index, prompt_field, answer_field, id_field, group_field)
               for index, (row, where) in enumerate(rows)]
    if not records:
        raise DataError(f"{source}: no records")
    if integer_answers:
        from rl_service.rewards.verifiers import parse_integer

        for record, (_, where) in zip(records, rows):
            # The integer verifier scores such a row 0 whatever the model writes: it can never be learned.
            if parse_integer(record.answer) is None:
                raise DataError(f"{where}: field '{answer_field}' is {record.answer!r}, not an integer; "
                                "reward.verifier: integer can never score it (use verifier math, or fix the row)")
    seen: dict[int, str] = {}
    for record, (_, where) in zip(records, rows):
        if record.prompt_id in seen:
            raise DataError(f"{where}: duplicate id {record.prompt_id} (first at {seen[record.prompt_id]})")
        seen[record.prompt_id] = where
    return records
