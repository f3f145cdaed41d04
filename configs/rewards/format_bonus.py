"""An example custom reward (configs/custom_reward_example.yaml): correctness with a small format bonus.

Called as `reward(completion, answer)` once per completion, in a separate, time- and memory-limited
process (rl_service/rewards/custom.py). `completion` is the whole generated text, reasoning trace
included; `answer` is the prompt's gold answer as a string.

A correct final answer scores 1.0, as with the built-in integer verifier, so accuracy metrics keep
their meaning. A wrong answer that still has the expected shape — a closed `</think>` block followed
by exactly one integer — scores 0.1: early in training that separates well-formed attempts from
rambling, so a GRPO group of wrong answers still has a spread to learn from.
"""
import re

FORMAT_BONUS = 0.1
_INTEGER = re.compile(r"[-+]?\d+")


def reward(completion: str, answer: str) -> float:
    if "</think>" not in completion:
        return 0.0
    final = completion.rsplit("</think>", 1)[1].strip().replace(",", "")
    if not _INTEGER.fullmatch(final):
        return 0.0
    return 1.0 if int(final) == int(answer) else FORMAT_BONUS
