"""Build the bundled offline BVPO dataset (ALGORITHMS.md §BVPO.7) from the built-in arithmetic task.

    .venv/bin/python scripts/make_bvpo_dataset.py [--seed 0] [--rows 256] [--out configs/data/bvpo_offline.jsonl]

One JSONL row per train problem of `make_arithmetic_split(seed, rows, num_eval, levels)` — the same
split a job with that seed, `num_eval` and levels uses, so no row is one of its eval questions:

- `trace_chosen`: the correct worked trace and answer, as the built-in model writes them;
- `trace_rejected`: the same trace ending in a plausible wrong answer (off by 1, 2 or 10: a slip
  in the last column or a dropped carry);
- `empty_chosen` / `empty_rejected`: the bare correct / wrong answer (reasoning off, §BVPO.2).

Deterministic: the same arguments give the same file byte for byte.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rl_service.data.arithmetic import format_completion, make_arithmetic_split  # noqa: E402

SLIPS = (-10, -2, -1, 1, 2, 10)


def wrong_answer(answer: int, rng: random.Random) -> int:
    """A nearby wrong answer, non-negative when the right one is (a plausible mistake, not noise)."""
    while True:
        wrong = answer + rng.choice(SLIPS)
        if wrong != answer and (wrong >= 0 or answer < 0):
            return wrong


def build_rows(seed: int, rows: int, num_eval: int, levels: list[int]) -> list[dict]:
    train, _ = make_arithmetic_split(seed, rows, num_eval, levels)
    rng = random.Random(f"bvpo-offline-{seed}")
    out = []
    for problem in train:
        answer = int(problem.answer)
        wrong = wrong_answer(answer, rng)
        suffix = f"So {answer}."
        assert problem.trace.endswith(suffix), problem.trace
        wrong_trace = problem.trace[: -len(suffix)] + f"So {wrong}."
        out.append({
            "id": problem.prompt_id,
            "prompt": problem.question,
            "answer": problem.answer,
            "trace_chosen": format_completion(problem.trace, problem.answer, thinking=True),
            "trace_rejected": format_completion(wrong_trace, str(wrong), thinking=True),
            "empty_chosen": format_completion("", problem.answer, thinking=False),
            "empty_rejected": format_completion("", str(wrong), thinking=False),
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="the job seed whose eval split must stay held out")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--num-eval", type=int, default=128, help="data.arithmetic.num_eval of the jobs using it")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--out", default=str(REPO / "configs" / "data" / "bvpo_offline.jsonl"))
    args = parser.parse_args()
    rows = build_rows(args.seed, args.rows, args.num_eval, args.levels)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
