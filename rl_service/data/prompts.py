"""Prompt datasets: a record is (prompt_id, user message, gold answer).

Sources: the built-in arithmetic task, or local files with `prompt` and `answer` fields — JSONL/JSON
read here line by line so an error names its line, and CSV/Parquet read through HF `datasets`.
Prompt ids are stable across restarts: an explicit integer `id` field, else the record's index
in the file; the statistics actor indexes its arrays by them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rl_service.errors import DataError


@dataclass(frozen=True)
class PromptRecord:
    prompt_id: int
    prompt: str
    answer: str


_MAX_PROMPT_ID = 2**40  # statistics arrays are indexed by id; keep them addressable


def _record_from_row(row: object, where: str, index: int) -> PromptRecord:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with 'prompt' and 'answer', got {type(row).__name__}")
    for field in ("prompt", "answer"):
        if field not in row:
            raise DataError(f"{where}: missing field '{field}'")
    prompt, answer = row["prompt"], row["answer"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: field 'prompt' must be a non-empty string")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or str(answer).strip() == "":
        raise DataError(f"{where}: field 'answer' must be a non-empty string or number")
    prompt_id = row.get("id", index)
    if isinstance(prompt_id, bool) or not isinstance(prompt_id, int) or not 0 <= prompt_id < _MAX_PROMPT_ID:
        raise DataError(f"{where}: field 'id' must be an integer in [0, 2**40)")
    return PromptRecord(prompt_id=prompt_id, prompt=prompt, answer=str(answer).strip())


def _read_json_rows(path: Path) -> list[tuple[object, str]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        return [(row, f"{path}: record {k}") for k, row in enumerate(rows)]
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((json.loads(line), f"{path}:{line_number}"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_number}: not valid JSON ({exc.msg})") from None
    return rows


def _read_table_rows(path: Path) -> list[tuple[object, str]]:
    import datasets  # only for formats we do not parse ourselves

    builder = {".csv": "csv", ".parquet": "parquet"}[path.suffix]
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types; the user needs the file and the reason
        raise DataError(f"{path}: cannot read as {builder} ({exc})") from None
    return [(row, f"{path}: row {k}") for k, row in enumerate(table)]


def load_prompt_file(path: str | Path) -> list[PromptRecord]:
    """Read prompts with answers from a .jsonl/.json/.csv/.parquet file; errors name file and line."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: dataset file not found")
    if file.suffix in (".jsonl", ".json"):
        rows = _read_json_rows(file)
    elif file.suffix in (".csv", ".parquet"):
        rows = _read_table_rows(file)
    else:
        raise DataError(f"{file}: unsupported dataset format '{file.suffix}' (use .jsonl, .json, .csv or .parquet)")
    records = [_record_from_row(row, where, index) for index, (row, where) in enumerate(rows)]
    if not records:
        raise DataError(f"{file}: no records")
    seen: dict[int, str] = {}
    for record, (_, where) in zip(records, rows):
        if record.prompt_id in seen:
            raise DataError(f"{where}: duplicate id {record.prompt_id} (first at {seen[record.prompt_id]})")
        seen[record.prompt_id] = where
    return records
