"""Preference pairs for DPO / BVPO (ALGORITHMS.md §DPO, §BVPO.1–3, §BVPO.7): read from JSONL, built
from scored samples, and tokenized for the learner.

A JSONL row (offline mode, §BVPO.7) is one prompt with a pair for each mode the algorithm trains::

    {"id": 7, "prompt": "What is 3 + 4?", "answer": "7",
     "trace_chosen": "<think>\\n3+4=7. So 7.\\n</think>\\n\\n7", "trace_rejected": "<think>...</think>\\n\\n8",
     "empty_chosen": "7", "empty_rejected": "8"}

`prompt` is the user message (the chat template is applied at tokenization), `trace_*` are
completions generated with reasoning on, `empty_*` completions after the template's empty think
block (reasoning off, §BVPO.2). Trace-only `dpo` reads only `prompt` and the trace pair, and
`bvpo` needs the `empty_*` pair too. The trace pair may be named `chosen` / `rejected` instead,
TRL's (and OpenRLHF's) standard preference format, as strings or in TRL's conversational form (one
user message as the prompt, one assistant message per completion); a row naming both forms with
different texts is refused as ambiguous. `id` (default: the line's index) and `answer` are
optional: offline training never scores a completion, and evaluation uses the eval split. A bad row
— not JSON, not UTF-8, a missing or empty field, chosen identical to rejected, a repeated id — is
reported with its file:line (and, when a field is missing, the fields a row holds) and skipped and
counted, or stops the run (`on_bad_row="error"`).

Online mode (§BVPO.1–2): :func:`select_pairs` ranks each prompt's samples of one mode by reward,
best vs worst (ties skipped and counted). ``pairing="same_prompts"`` keeps only prompts with a pair
in every mode (both loss terms on the same prompts); ``"per_term"`` (§BVPO.3) keeps every pair, so
a prompt may carry a pair in one mode only.
"""
from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from rl_service.data.prompts import DuplicateKey, looked_up_where, parse_json, read_data_file
from rl_service.errors import DataError

log = logging.getLogger("rl_service")

PAIR_FIELDS = ("trace_chosen", "trace_rejected", "empty_chosen", "empty_rejected")
# TRL's / OpenRLHF's names of the one pair plain DPO trains on: the trace pair here.
TRACE_ALIASES = {"trace_chosen": "chosen", "trace_rejected": "rejected"}
_MAX_PAIR_ID = 2**40
_REPORTED_BAD_ROWS = 20  # more than this are counted but not each logged


@dataclass(frozen=True)
class PreferenceRow:
    """One prompt with a chosen/rejected pair per mode, as text."""
    pair_id: int
    prompt: str
    answer: str | None
    trace_chosen: str
    trace_rejected: str
    empty_chosen: str | None = None     # None when the job is trace-only dpo (not read)
    empty_rejected: str | None = None


@dataclass
class PreferenceDataset:
    rows: list[PreferenceRow]
    bad_rows: list[str] = field(default_factory=list)   # "file:line: why", one per skipped row

    @property
    def num_skipped(self) -> int:
        return len(self.bad_rows)


def _accepted_fields(with_empty: bool) -> str:
    """What a row holds, for the error of a row that lacks a field."""
    if with_empty:
        return ("a bvpo row holds prompt, trace_chosen, trace_rejected (or chosen, rejected), empty_chosen, "
                "empty_rejected; id and answer are optional")
    return "a dpo row holds prompt, chosen, rejected (or trace_chosen, trace_rejected); id and answer are optional"


def _as_text(value: object, name: str, role: str) -> tuple[str | None, str]:
    """A field's text and "", or None and why: a string, or TRL's conversational form holding
    exactly one message of `role` (a system message or a longer chat would be dropped silently)."""
    if isinstance(value, list):
        message = value[0] if len(value) == 1 else None
        if not (isinstance(message, dict) and message.get("role") == role and isinstance(message.get("content"), str)):
            return None, (f"field '{name}' must be a string or one {role} message "
                          f'[{{"role": "{role}", "content": "..."}}] (system messages and longer chats are not supported)')
        value = message["content"]
    if not isinstance(value, str) or not value.strip():
        return None, f"field '{name}' must be a non-empty string"
    return value, ""


def _row_texts(row: dict, with_empty: bool) -> tuple[dict[str, str] | None, dict[str, str], str]:
    """The prompt's and the pairs' texts by canonical name, the key each came from, and why not."""
    names = ("prompt", *(PAIR_FIELDS if with_empty else PAIR_FIELDS[:2]))
    # A missing trace field is named in the form the row uses (TRL's for a dpo row that uses neither).
    trl_form = not any(name in row for name in TRACE_ALIASES) and (
        any(alias in row for alias in TRACE_ALIASES.values()) or not with_empty)
    texts: dict[str, str] = {}
    keys: dict[str, str] = {}
    for name in names:
        alias = TRACE_ALIASES.get(name)
        given = [key for key in (name, alias) if key is not None and key in row]
        if not given:
            missing = alias if alias is not None and trl_form else name
            return None, keys, f"missing field '{missing}'"   # load_preference_file adds what a row holds
        values = []
        for key in given:
            text, problem = _as_text(row[key], key, "user" if name == "prompt" else "assistant")
            if text is None:
                return None, keys, problem
            values.append(text)
        if len(values) == 2 and values[0] != values[1]:
            return None, keys, (f"fields '{given[0]}' and '{given[1]}' name the same completion but differ: "
                                "keep one of them")
        texts[name], keys[name] = values[0], given[0]
    return texts, keys, ""


def _row_problem(row: object, index: int, seen_ids: dict[int, int], line_number: int,
                 with_empty: bool = True) -> tuple[PreferenceRow | None, str]:
    """The row, or None and why it is bad."""
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    texts, keys, problem = _row_texts(row, with_empty)
    if texts is None:
        return None, problem
    for mode in ("trace", "empty") if with_empty else ("trace",):
        if texts[f"{mode}_chosen"].strip() == texts[f"{mode}_rejected"].strip():
            return None, f"{keys[f'{mode}_chosen']} and {keys[f'{mode}_rejected']} are identical"
    answer = row.get("answer")
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
        return None, "field 'answer' must be a string or number"
    if isinstance(answer, float) and not math.isfinite(answer):   # JSON's NaN / Infinity: "nan" is no answer
        return None, f"field 'answer' is {answer}, not a finite number"
    checked = {keys[name]: text for name, text in texts.items()}
    if isinstance(answer, str):
        checked["answer"] = answer
    for name, text in checked.items():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:   # a lone surrogate ("\ud800"): valid JSON, not text (the tokenizer fails)
            return None, f"field '{name}' holds {text[exc.start]!r} at character {exc.start}, a lone surrogate"
    pair_id = row.get("id", index)
    if isinstance(pair_id, bool) or not isinstance(pair_id, int) or not 0 <= pair_id < _MAX_PAIR_ID:
        return None, "field 'id' must be an integer in [0, 2**40)"
    if pair_id in seen_ids:
        return None, f"duplicate id {pair_id} (first on line {seen_ids[pair_id]})"
    seen_ids[pair_id] = line_number
    return PreferenceRow(pair_id, texts["prompt"], None if answer is None else str(answer).strip(),
                         *(texts.get(name) for name in PAIR_FIELDS)), ""


def load_preference_file(path: str | Path, on_bad_row: Literal["skip", "error"] = "skip",
                         source: str = "preference.dataset_path", with_empty: bool = True) -> PreferenceDataset:
    """Read JSONL preference rows; each bad row names its file:line (skipped and counted, or a DataError).
    `with_empty`: the rows need the reasoning-off pair (bvpo); trace-only dpo neither needs nor keeps it."""
    file = Path(path)
    try:
        is_file = file.is_file()
    except OSError as exc:   # a directory above it that cannot be entered
        raise DataError(f"{source}: {file}: cannot read ({exc.strerror or exc})") from None
    if not is_file:
        raise DataError(f"{source}: {file}: dataset file not found{looked_up_where(file)}")
    rows: list[PreferenceRow] = []
    bad: list[str] = []
    seen_ids: dict[int, int] = {}
    index = 0
    # Bytes, split on newlines ourselves: one non-UTF-8 line must not hide the file's other rows.
    for line_number, raw in enumerate(read_data_file(file, f"{source}: ").split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
            row, problem = _row_problem(parse_json(text), index, seen_ids, line_number, with_empty)
        except DuplicateKey as exc:
            row, problem = None, f"field '{exc}' appears twice in the row"
        except UnicodeDecodeError as exc:
            row, problem = None, f"not valid UTF-8 (byte {exc.start})"
        except json.JSONDecodeError as exc:
            row, problem = None, f"not valid JSON ({exc.msg})"
        except RecursionError:
            row, problem = None, "nested too deeply to be a preference row"
        index += 1
        if row is None:
            message = f"{file}:{line_number}: {problem}"
            # A missing field may be a file in another format: say which fields a row holds.
            hint = f"; {_accepted_fields(with_empty)}" if problem.startswith("missing field") else ""
            if on_bad_row == "error":
                raise DataError(f"{message} (preference.on_bad_row=error){hint}")
            message += hint
            if len(bad) < _REPORTED_BAD_ROWS:
                log.warning("skipping bad preference row %s", message)
            bad.append(message)
            continue
        rows.append(row)
    if len(bad) > _REPORTED_BAD_ROWS:
        log.warning("skipped %d bad preference rows in %s (first %d listed)", len(bad), file, _REPORTED_BAD_ROWS)
    if not rows:
        first = f"; first: {bad[0]}" if bad else ""   # why, in the one line the user surely sees
        raise DataError(f"{file}: no usable preference rows ({len(bad)} bad){first}")
    return PreferenceDataset(rows=rows, bad_rows=bad)


# -- online pair construction (§BVPO.1–2) ---------------------------------------------------------

@dataclass(frozen=True)
class PairSelection:
    """Which samples of a step form its pairs; indices are into the step's concatenated rollout.

    ``trace[k]``/``empty[k]`` are the (chosen, rejected) samples of prompt ``prompts[k]`` per mode,
    None where that mode has no pair (``per_term`` only; ``empty`` is empty for trace-only DPO);
    ``trace_resamples[k]`` are K random reward-ordered trace pairs of that prompt, for α̂ (§BVPO.6).
    """
    prompts: list[int]
    trace: list[tuple[int, int] | None]
    empty: list[tuple[int, int] | None]
    trace_resamples: list[list[tuple[int, int]]]
    counts: dict[str, float]


def best_vs_worst(rewards: Sequence[float], samples: Sequence[int]) -> tuple[int, int] | None:
    """(best, worst) sample of one prompt in one mode; None when their rewards tie (or < 2 samples).
    The first sample wins among equals: samples are i.i.d., so that is a uniform choice."""
    if len(samples) < 2:
        return None
    best = max(samples, key=lambda k: (rewards[k], -k))
    worst = min(samples, key=lambda k: (rewards[k], k))
    return None if rewards[best] == rewards[worst] else (best, worst)


def random_ordered_pairs(rewards: Sequence[float], samples: Sequence[int], count: int,
                         rng: random.Random) -> list[tuple[int, int]]:
    """`count` pairs (i, j) drawn uniformly, with replacement, among the prompt's samples with
    r_i > r_j: resamples of the trace estimator from this prompt's traces (§BVPO.6, ours)."""
    ordered = [(i, j) for i in samples for j in samples if rewards[i] > rewards[j]]
    return [ordered[rng.randrange(len(ordered))] for _ in range(count)] if ordered else []


PAIRINGS = ("same_prompts", "per_term")


def select_pairs(rewards: Sequence[float], request_index: Sequence[int], num_prompts: int, with_empty: bool,
                 resamples: int = 0, seed: int = 0, pairing: str = "same_prompts") -> PairSelection:
    """Pairs of one online step from scored samples.

    Sample k belongs to request ``request_index[k]``: requests ``0..num_prompts−1`` are the prompts
    with reasoning on, ``num_prompts + i`` prompt i with reasoning off (when ``with_empty``); the
    modes may have different numbers of samples. ``same_prompts`` keeps a prompt only if it has a
    non-tied pair in every generated mode; ``per_term`` keeps it if it has one in any mode (§BVPO.3).

    ``counts``: ``pairs`` (prompts kept), ``trace_pairs``/``empty_pairs`` (pairs that train),
    ``trace_pair_yield``/``empty_pair_yield`` (fraction of the step's prompts with a pair in that
    mode, kept or not), ties per mode and ``prompts_without_pair`` (prompts dropped).
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    by_request: dict[int, list[int]] = {}
    for sample, request in enumerate(request_index):
        by_request.setdefault(int(request), []).append(sample)
    rng = random.Random(seed)
    counts = {"trace_ties": 0.0, "empty_ties": 0.0, "prompts_without_pair": 0.0}
    selection = PairSelection([], [], [], [], counts)
    yields = {"trace": 0, "empty": 0}
    for prompt in range(num_prompts):
        trace = best_vs_worst(rewards, by_request.get(prompt, []))
        empty = best_vs_worst(rewards, by_request.get(num_prompts + prompt, [])) if with_empty else None
        counts["trace_ties"] += trace is None
        counts["empty_ties"] += with_empty and empty is None
        yields["trace"] += trace is not None
        yields["empty"] += empty is not None
        complete = trace is not None and (not with_empty or empty is not None)
        if not (complete or (pairing == "per_term" and (trace is not None or empty is not None))):
            counts["prompts_without_pair"] += 1
            continue
        selection.prompts.append(prompt)
        selection.trace.append(trace)
        if with_empty:
            selection.empty.append(empty)
        if resamples:
            selection.trace_resamples.append(random_ordered_pairs(rewards, by_request.get(prompt, []), resamples, rng))
    counts["pairs"] = float(len(selection.prompts))
    counts["trace_pairs"] = float(sum(pair is not None for pair in selection.trace))
    counts["empty_pairs"] = float(sum(pair is not None for pair in selection.empty))
    counts["trace_pair_yield"] = yields["trace"] / num_prompts if num_prompts else 0.0
    if with_empty:
        counts["empty_pair_yield"] = yields["empty"] / num_prompts if num_prompts else 0.0
    return selection


# -- tokenization for the learner -------------------------------------------------------------------

@dataclass
class TokenizedPair:
    """Token ids of one prompt's pairs: prompts chat-rendered, completions ending in EOS.

    ``pair_id`` keys the learner's reference log-prob cache: equal ids must mean equal tokens.
    ``empty_*`` are None for trace-only DPO, and one mode's fields are None where that mode has no
    pair (``per_term`` pairing); ``trace_resamples`` holds K (chosen, rejected) completions for α̂
    (online mode only).
    """
    pair_id: int
    trace_prompt: list[int] | None
    trace_chosen: list[int] | None
    trace_rejected: list[int] | None
    empty_prompt: list[int] | None = None
    empty_chosen: list[int] | None = None
    empty_rejected: list[int] | None = None
    trace_resamples: list[tuple[list[int], list[int]]] = field(default_factory=list)


def tokenize_row(tokenizer, row: PreferenceRow, with_empty: bool = True) -> TokenizedPair:
    """A JSONL row as token ids: the prompt rendered with reasoning on (trace) and off (empty, the
    template's empty think block, §BVPO.2), each completion followed by EOS as a generator ends it."""
    from rl_service.models.loading import render_prompt

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def completion(text: str) -> list[int]:
        return encode(text) + [tokenizer.eos_token_id]

    pair = TokenizedPair(row.pair_id, encode(render_prompt(tokenizer, row.prompt, True)),
                         completion(row.trace_chosen), completion(row.trace_rejected))
    if with_empty:
        pair.empty_prompt = encode(render_prompt(tokenizer, row.prompt, False))
        pair.empty_chosen = completion(row.empty_chosen)
        pair.empty_rejected = completion(row.empty_rejected)
    return pair


def pairs_from_rollout(rollout, selection: PairSelection, first_pair_id: int) -> list[TokenizedPair]:
    """The selected samples of an online step as :class:`TokenizedPair` s, the exact tokens the pool
    sampled (EOS included when it stopped). Pair ids count up from ``first_pair_id``: online pairs
    never repeat, so each id is new to the reference cache."""
    def tokens(sample: int) -> list[int]:
        return list(rollout.completion_token_ids[sample])

    pairs = []
    for k in range(len(selection.prompts)):
        pair = TokenizedPair(first_pair_id + k, None, None, None)
        if selection.trace[k] is not None:
            chosen, rejected = selection.trace[k]
            pair.trace_prompt = list(rollout.prompt_token_ids[chosen])
            pair.trace_chosen, pair.trace_rejected = tokens(chosen), tokens(rejected)
        if selection.empty and selection.empty[k] is not None:
            empty_chosen, empty_rejected = selection.empty[k]
            pair.empty_prompt = list(rollout.prompt_token_ids[empty_chosen])
            pair.empty_chosen, pair.empty_rejected = tokens(empty_chosen), tokens(empty_rejected)
        if selection.trace_resamples:
            pair.trace_resamples = [(tokens(i), tokens(j)) for i, j in selection.trace_resamples[k]]
        pairs.append(pair)
    return pairs
