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
import time
from typing import Callable, Literal, Sequence

from rl_service.rewards.custom import COUNTER_KEYS as CUSTOM_COUNTER_KEYS

THINK_END = "</think>"
_INTEGER = re.compile(r"^[-+]?\d+$")
VerifierName = Literal["integer", "math"]


def final_answer_text(completion: str) -> str:
    """The answer part of a completion: what follows the last `</think>` (all of it if none)."""
    tail = completion.rsplit(THINK_END, 1)[-1]
    return tail.strip()


def parse_integer(text: str) -> int | None:
    """The integer `text` writes, or None: one integer, leading zeros and '+' allowed, commas read as
    thousands separators ("1,234"). The completion and the gold answer both go through this, so
    "1,234" and "1234" match whichever side writes the commas; "1234.0" or "1 234" is not an integer."""
    text = str(text).strip().replace(",", "")
    return int(text) if _INTEGER.match(text) else None


def verify_integer(completion: str, answer: str) -> float:
    """1.0 iff the final answer is exactly one integer equal to `answer` (both read by `parse_integer`)."""
    predicted, gold = parse_integer(final_answer_text(completion)), parse_integer(answer)
    return 1.0 if predicted is not None and predicted == gold else 0.0


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
# What a reward call counts besides its rewards: custom-function failures, verifier timeouts, and
# rewards that were outside `reward.clip` or not finite.
SCORE_COUNTER_KEYS = (*CUSTOM_COUNTER_KEYS, "verifier_timeouts", "rewards_clipped")


def clip_rewards(rewards: Sequence[float], low: float, high: float) -> tuple[list[float], int]:
    """(rewards in [low, high], how many were changed): one outside is clipped to the range, a
    non-finite one (NaN, ±inf) becomes 0. Without this a reward of 1e308 makes the group's mean
    and std overflow: every advantage 0 and inf in the checkpointed statistics."""
    clipped, changed = [], 0
    for reward in rewards:
        value = float(reward)
        kept = (0.0 if not math.isfinite(value) else min(max(value, low), high))
        changed += kept != value or not math.isfinite(value)
        clipped.append(kept)
    return clipped, changed


def score_batch(completions: Sequence[str], answers: Sequence[str], verifier: VerifierName,
                timeout_s: float = 5.0) -> list[float]:
    """Score a batch; `answers[k]` is the gold answer of `completions[k]`."""
    return score_batch_counted(completions, answers, verifier, timeout_s)[0]


def score_batch_counted(completions: Sequence[str], answers: Sequence[str], verifier: VerifierName,
                        timeout_s: float = 5.0) -> tuple[list[float], int]:
    """(rewards, timeouts): a completion whose check ran past `timeout_s` scores 0 and is counted
    (DESIGN.md "Faults"), whatever the verifier would have said after the limit."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    if verifier not in VERIFIERS:
        raise ValueError(f"unknown verifier {verifier!r}; expected one of {sorted(VERIFIERS)}")
    rewards, timeouts = [], 0
    for text, gold in zip(completions, answers):
        started = time.perf_counter()
        reward = verify_integer(text, gold) if verifier == "integer" else verify_math(text, gold, timeout_s)
        if time.perf_counter() - started > timeout_s:
            reward, timeouts = 0.0, timeouts + 1
        rewards.append(reward)
    return rewards, timeouts
