"""Synthetic arithmetic: the built-in task that the built-in model is pre-trained on and RL improves.

Pure Python on purpose: the rollout workers, the reward and the tests import this without torch.

Each problem carries a short worked trace (least significant column first, the way the model can
compute it one token at a time). Traces are kept terse because RL samples thousands of completions
on two cores and every token costs; the whole assistant completion stays around 20–45 tokens.

Ids are stable: the same ``seed`` and arguments give the same problems and ids in any process,
because every random stream is seeded from a string (``random.Random`` hashes str seeds with
SHA-512, so ``PYTHONHASHSEED`` does not matter).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

__all__ = [
    "ArithmeticProblem",
    "LEVELS",
    "EVAL_ID_OFFSET",
    "make_problem",
    "check_split_sizes",
    "make_arithmetic_split",
    "format_completion",
    "extract_answer",
    "is_correct",
]


@dataclass(frozen=True)
class ArithmeticProblem:
    prompt_id: int
    question: str
    answer: str
    level: int
    trace: str


LEVELS: dict[int, str] = {
    1: "1-digit add/sub (0-9 op 0-9; subtraction may go negative)",
    2: "2-digit add/sub (10-99; subtraction ordered so the result is >= 0)",
    3: "multiplication 1-digit x 1-digit (30%) or 2-digit x 1-digit (70%)",
    4: "3-digit add/sub (100-999; subtraction ordered so the result is >= 0)",
    5: "multiplication 2-digit x 2-digit",
}

_INT_RE = re.compile(r"-?[0-9]+")

# Eval ids live far above any realistic train size so the two never collide.
EVAL_ID_OFFSET = 1_000_000

# Distinct questions each level can produce; lets the split refuse impossible sizes up front
# instead of looping forever looking for unseen questions.
_LEVEL_CAPACITY: dict[int, int] = {
    1: 10 * 10 * 2,
    2: 90 * 90 + 90 * 91 // 2,
    3: 9 * 9 + 90 * 8,
    4: 900 * 900 + 900 * 901 // 2,
    5: 90 * 90,
}


def _digits(n: int) -> list[int]:
    """Digits of a non-negative int, least significant first."""
    return [int(c) for c in reversed(str(n))]


def _add_trace(a: int, b: int) -> str:
    if a < 10 and b < 10:
        return f"{a}+{b}={a + b}. So {a + b}."
    da, db = _digits(a), _digits(b)
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = da[i] if i < len(da) else 0
        y = db[i] if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={s}")
        carry = s // 10
    return ", ".join(steps) + f". So {a + b}."


def _sub_trace(a: int, b: int) -> str:
    if a < 10 and b < 10:
        return f"{a}-{b}={a - b}. So {a - b}."
    # Multi-digit subtraction is generated with a >= b; a borrowed column shows the 1 prefixed
    # to the top digit ("13-8=5") and the borrow paid back as "-1" in the next column.
    da, db = _digits(a), _digits(b)
    steps, borrow = [], 0
    for i in range(len(da)):
        x = da[i]
        y = db[i] if i < len(db) else 0
        need = 1 if x - borrow - y < 0 else 0
        top = x + 10 * need
        steps.append(f"{top}" + ("-1" if borrow else "") + f"-{y}={top - borrow - y}")
        borrow = need
    return ", ".join(steps) + f". So {a - b}."


def _mul_trace(a: int, b: int) -> str:
    if a < 10:
        return f"{a}*{b}={a * b}. So {a * b}."
    if b < 10:
        steps, carry = [], 0
        for x in _digits(a):
            p = x * b + carry
            steps.append(f"{x}*{b}" + (f"+{carry}" if carry else "") + f"={p}")
            carry = p // 10
        return ", ".join(steps) + f". So {a * b}."
    # 2-digit x 2-digit: partial products then one addition. Deliberately not spelled out
    # column by column: it is the hard level, and the full trace would double its length.
    lo, hi = b % 10, b // 10
    return f"{a}*{lo}={a * lo}, {a}*{hi}={a * hi}, {a * lo}+{a * hi * 10}={a * b}. So {a * b}."


def make_problem(rng: random.Random, level: int) -> tuple[str, str, str]:
    """Draw one problem of ``level`` from ``rng``; returns (question, answer, trace)."""
    if isinstance(level, bool) or level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level!r}")
    if level in (1, 2, 4):
        lo, hi = {1: (0, 9), 2: (10, 99), 4: (100, 999)}[level]
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if rng.random() < 0.5:
            op, ans, trace = "+", a + b, _add_trace(a, b)
        else:
            if level > 1 and a < b:
                a, b = b, a
            op, ans, trace = "-", a - b, _sub_trace(a, b)
    elif level == 3:
        if rng.random() < 0.3:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
        else:
            a, b = rng.randint(10, 99), rng.randint(2, 9)
        op, ans, trace = "*", a * b, _mul_trace(a, b)
    else:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        op, ans, trace = "*", a * b, _mul_trace(a, b)
    return f"What is {a} {op} {b}?", str(ans), trace


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def _check_levels(levels: Sequence[int]) -> list[int]:
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence):
        raise ValueError(f"levels must be a sequence of ints from {sorted(LEVELS)}, got {levels!r}")
    out = list(levels)
    if not out:
        raise ValueError("levels must not be empty")
    bad = [lv for lv in out if isinstance(lv, bool) or lv not in LEVELS]
    if bad:
        raise ValueError(f"levels contains unknown level(s) {bad!r}; known: {sorted(LEVELS)}")
    if len(set(out)) != len(out):
        raise ValueError(f"levels contains duplicates: {out!r}")
    return out


def check_split_sizes(num_train: int, num_eval: int, levels: Sequence[int]) -> list[int]:
    """The levels, once the split sizes are known to be makeable (ValueError naming the size that is
    not); the config checks them with this too, so a job is refused before anything starts."""
    num_train = _check_count("num_train", num_train)
    num_eval = _check_count("num_eval", num_eval)
    lv = _check_levels(levels)
    if num_train >= EVAL_ID_OFFSET:
        raise ValueError(f"num_train must be < {EVAL_ID_OFFSET} so ids stay disjoint, got {num_train}")
    for position, level in enumerate(lv):
        need = len(range(position, num_eval, len(lv)))   # eval is dealt round-robin over the levels
        if need > _LEVEL_CAPACITY[level]:
            raise ValueError(
                f"num_eval={num_eval} needs {need} distinct level-{level} questions, "
                f"but level {level} has only {_LEVEL_CAPACITY[level]}"
            )
        if num_train and need >= _LEVEL_CAPACITY[level]:
            raise ValueError(
                f"num_eval={num_eval} uses every level-{level} question; none left for num_train"
            )
    return lv


def make_arithmetic_split(
    seed: int, num_train: int, num_eval: int, levels: Sequence[int]
) -> tuple[list[ArithmeticProblem], list[ArithmeticProblem]]:
    """Deterministic train/eval split over ``levels``.

    Eval is drawn first, from its own stream, so it does not depend on ``num_train``: the
    held-out set for a seed stays the same whether you ask for 0 or 100k train problems.
    Eval questions are unique and levels are balanced round-robin (so per-level accuracy is
    comparable). Train never contains an eval question, but may repeat its own questions:
    level 1 has only 200 distinct questions, and a large train set is a stream of draws.
    Ids: train ``0..num_train-1``, eval ``EVAL_ID_OFFSET + i``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    lv = check_split_sizes(num_train, num_eval, levels)
    eval_levels = [lv[i % len(lv)] for i in range(num_eval)]
    rng = random.Random(f"arithmetic-eval-{seed}")
    seen: set[str] = set()
    eval_set: list[ArithmeticProblem] = []
    for i, level in enumerate(eval_levels):
        while True:
            q, a, t = make_problem(rng, level)
            if q not in seen:
                break
        seen.add(q)
        eval_set.append(ArithmeticProblem(EVAL_ID_OFFSET + i, q, a, level, t))

    rng = random.Random(f"arithmetic-train-{seed}")
    train_levels = [lv[i % len(lv)] for i in range(num_train)]
    rng.shuffle(train_levels)
    train: list[ArithmeticProblem] = []
    for i, level in enumerate(train_levels):
        while True:
            q, a, t = make_problem(rng, level)
            if q not in seen:
                break
        train.append(ArithmeticProblem(i, q, a, level, t))
    return train, eval_set


def format_completion(trace: str, answer: str, thinking: bool = True) -> str:
    """The assistant text the model is trained to emit (the trainer appends ``<|im_end|>``).

    With thinking off the empty ``<think>\\n\\n</think>\\n\\n`` block belongs to the prompt
    (the chat template adds it), so the completion is the bare answer.
    """
    if thinking:
        return f"<think>\n{trace}\n</think>\n\n{answer}"
    return f"{answer}"


def extract_answer(text: str) -> str:
    """The final answer in a completion: the text after the last ``</think>``, stripped."""
    idx = text.rfind("</think>")
    if idx >= 0:
        text = text[idx + len("</think>"):]
    return text.replace("<|im_end|>", "").replace("<|endoftext|>", "").strip()


def is_correct(text: str, answer: str) -> bool:
    """True when the completion's final answer is exactly the integer ``answer``."""
    # A strict pattern, not int(): int() would also accept "+85", "8_5" or " 85 \n".
    got = extract_answer(text)
    return _INT_RE.fullmatch(got) is not None and int(got) == int(answer)
