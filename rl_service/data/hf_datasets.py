"""Prompts from a local Hugging Face dataset (`data.source: hf`).

`data.hf.path` is either a `save_to_disk` directory (a `Dataset` or a `DatasetDict`, read with
`load_from_disk`: Arrow files, nothing unpickled) or a local dataset directory of data files that
`load_dataset` reads (parquet, csv, json, arrow). Nothing is fetched from the Hub: the path must
exist. Columns are mapped by `prompt_column` / `answer_column` (/ `id_column`); a prompt may be a
string or a chat (a list of {role, content} messages). Errors are the JSONL path's one-liners,
naming the dataset, the split and the row (rl_service/data/prompts.py `records_from_rows`).
"""
from __future__ import annotations

import re
from pathlib import Path

from rl_service.data.prompts import PromptRecord, _quiet_datasets, records_from_rows
from rl_service.errors import DataError


def _reason(exc: BaseException) -> str:
    # datasets wraps the reader's error ("An error occurred while generating the dataset"): the
    # innermost cause says what is wrong.
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _first_bad_json_line(path: Path) -> str | None:
    """`file:line: not valid JSON (...)` for the first JSON Lines record that does not parse, if any."""
    import json

    for file in sorted(path.rglob("*.json*")):
        if file.suffix not in (".json", ".jsonl") or not file.is_file():
            continue
        try:
            with file.open(encoding="utf-8", errors="replace") as lines:
                for number, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as exc:
                        if number == 1 and file.suffix == ".json":
                            break   # a whole-file JSON document, not JSON Lines: not ours to judge line by line
                        return f"{file}:{number}: not valid JSON ({exc.msg})"
        except OSError as exc:   # unreadable (permissions): what `datasets` failed on, named
            return f"{file}: cannot read ({exc.strerror or exc})"
    return None


# `datasets`' own words for a split it does not have ("Unknown split", "Bad split: test. Available
# splits: ...", an invalid split argument). Nothing looser: a path under /data/splits/, or a schema
# with a column named split, is no reason to blame the split.
_SPLIT_REFUSED = re.compile(r"\bUnknown split\b|\bBad split:|\bInvalid split argument\b")


def names_a_split(message: str) -> bool:
    """Whether an error of `datasets` is about the split asked for."""
    return _SPLIT_REFUSED.search(message) is not None


def _open_split(path: Path, split: str, split_field: str):
    import datasets

    saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    try:
        with _quiet_datasets():
            if not saved:
                return datasets.load_dataset(str(path), split=split)
            dataset = datasets.load_from_disk(str(path))
    except ValueError as exc:
        if names_a_split(str(exc)):
            raise DataError(f"{path}: no split '{split}' ({split_field}); {_reason(exc)}") from None
        raise DataError(f"{path}: cannot read as a Hugging Face dataset ({_reason(exc)})") from None
    except Exception as exc:  # datasets raises many types; the user needs the path and the reason
        bad_line = None if saved else _first_bad_json_line(path)
        raise DataError(bad_line or f"{path}: cannot read as a Hugging Face dataset ({_reason(exc)})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(f"{path}: no split '{split}' ({split_field}); it has {', '.join(sorted(dataset))}")
        return dataset[split]
    if split != "train":   # one saved Dataset has no split names: only the default may name it
        raise DataError(f"{path}: holds one split (a saved Dataset, not a DatasetDict), so {split_field} "
                        f"'{split}' names nothing; leave it 'train'")
    return dataset


def load_hf_split(settings, split: str, split_field: str, integer_answers: bool = False) -> list[PromptRecord]:
    """The records of one split; `settings` is `data.hf`, `split_field` the config field naming the split;
    `integer_answers` (reward.verifier: integer): every gold answer must read as an integer."""
    path = Path(settings.path).expanduser()
    try:
        path.is_dir()
    except OSError as exc:   # a directory above it that cannot be entered
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not path.exists():
        raise DataError(f"{path}: dataset not found (data.hf.path names a local dataset directory)")
    if not path.is_dir():
        raise DataError(f"{path}: is a file, not a dataset directory (a file goes in data.train_path with "
                        "source: jsonl)")
    dataset = _open_split(path, split, split_field)
    where = f"{path} [{split}]"
    columns = list(dataset.column_names)
    for column, field in ((settings.prompt_column, "prompt_column"), (settings.answer_column, "answer_column"),
                          (settings.id_column, "id_column"), (settings.group_column, "group_column")):
        if column is not None and column not in columns:
            raise DataError(f"{where}: no column '{column}' (data.hf.{field}); it has {', '.join(columns)}")
    rows = [(row, f"{where}: row {index}") for index, row in enumerate(dataset)]
    return records_from_rows(rows, where, settings.prompt_column, settings.answer_column, settings.id_column,
                             settings.group_column, integer_answers)
