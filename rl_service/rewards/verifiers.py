"""Verifiers: turn a completion and a reference answer into a reward in {0, 1}.

`integer`: the arithmetic task's exact check — the text after the last `</think>` must be exactly
one integer equal to the answer. `math`: Hugging Face `math-verify` (LaTeX/expression parsing and
symbolic equivalence) for general math answers. Both read only the final answer, never the trace,
so a model cannot earn reward by mentioning the right number in its reasoning.
"""
from __future__ import annotations

import math
import re
import threading
from typing import Callable, Literal, Sequence

THINK_END = "</think>"
_INTEGER = re.compile(r"^[-+]?\d+$")
VerifierName = Literal["integer", "math"]


def final_answer_text(completion: str) -> str:
    """The answer part of a completion: what follows the last `</think>` (all of it if none)."""
    tail = completion.rsplit(THINK_END, 1)[-1]
    return tail.strip()


def verify_integer(completion: str, answer: str) -> float:
    """1.0 iff the final answer is exactly one integer equal to `answer` (leading zeros and '+' allowed)."""
    text = final_answer_text(completion).replace(",", "")
    if not _INTEGER.match(text):
        return 0.0
    try:
        return 1.0 if int(text) == int(str(answer).strip()) else 0.0
    except ValueError:
        return 0.0


def verify_math(completion: str, answer: str, timeout_s: float = 5.0) -> float:
    """1.0 iff math-verify finds the final answer equivalent to the gold answer."""
    from math_verify import parse, verify  # imported lazily: sympy/antlr load in ~1 s

    # math-verify's own time limit uses signal.alarm, which works only on the main thread.
    limit = max(1, math.ceil(timeout_s)) if threading.current_thread() is threading.main_thread() else None
    text = final_answer_text(completion)
    try:
        gold = parse(str(answer), parsing_timeout=limit)
        predicted = parse(text, parsing_timeout=limit)
        if not gold or not predicted:
            return 0.0
        return 1.0 if verify(gold, predicted, timeout_seconds=limit) else 0.0
    except Exception:  # a malformed or pathological answer scores 0, never crashes the scorer
        return 0.0


VERIFIERS: dict[str, Callable[..., float]] = {"integer": verify_integer, "math": verify_math}


def score_batch(completions: Sequence[str], answers: Sequence[str], verifier: VerifierName,
                timeout_s: float = 5.0) -> list[float]:
    """Score a batch; `answers[k]` is the gold answer of `completions[k]`."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    if verifier == "integer":
        return [verify_integer(text, gold) for text, gold in zip(completions, answers)]
    if verifier == "math":
        return [verify_math(text, gold, timeout_s) for text, gold in zip(completions, answers)]
    raise ValueError(f"unknown verifier {verifier!r}; expected one of {sorted(VERIFIERS)}")
