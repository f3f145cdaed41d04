"""What a job trains on: prompt records for train and eval, the verifier, and prompt token ids.

Everything here runs in the driver before Ray starts, so a bad dataset or model directory is
reported (one line, exit 2) before any actor is placed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rl_service.config import JobConfig
from rl_service.data.arithmetic import make_arithmetic_split
from rl_service.data.prompts import PromptRecord, load_prompt_file
from rl_service.models.loading import render_prompt
from rl_service.rewards.custom import check_custom_reward, custom_reward_spec


@dataclass
class TaskData:
    train: list[PromptRecord]
    eval: list[PromptRecord]
    verifier: str                                   # "integer" | "math"
    eval_groups: dict[int, str] = field(default_factory=dict)  # eval prompt id -> group name (difficulty level)


def load_task(config: JobConfig) -> TaskData:
    data = config.data
    if data.source == "arithmetic":
        train_problems, eval_problems = make_arithmetic_split(
            config.seed, data.arithmetic.num_train, data.arithmetic.num_eval, data.arithmetic.levels)

        def to_record(problem):
            return PromptRecord(problem.prompt_id, problem.question, problem.answer)

        train = [to_record(problem) for problem in train_problems]
        evaluation = [to_record(problem) for problem in eval_problems]
        groups = {problem.prompt_id: f"level_{problem.level}" for problem in eval_problems}
        default_verifier = "integer"
    else:
        train = load_prompt_file(data.train_path)
        evaluation = load_prompt_file(data.eval_path) if data.eval_path else []
        groups = {}
        default_verifier = "math"
    if data.eval_limit is not None:
        evaluation = evaluation[:data.eval_limit]
    verifier = default_verifier if config.reward.verifier == "auto" else config.reward.verifier
    custom = custom_reward_spec(config.reward)
    if custom is not None:  # replaces the verifier in training; checked here so a bad file fails before Ray
        check_custom_reward(custom)
    return TaskData(train=train, eval=evaluation, verifier=verifier, eval_groups=groups)


class PromptTokenizer:
    """Chat-formats and tokenizes each prompt once, then serves it from a cache by prompt id."""

    def __init__(self, tokenizer, thinking: bool, max_prompt_tokens: int | None = None):
        self.tokenizer = tokenizer
        self.thinking = thinking
        self.max_prompt_tokens = max_prompt_tokens
        self._cache: dict[int, list[int]] = {}

    def __call__(self, record: PromptRecord) -> list[int]:
        tokens = self._cache.get(record.prompt_id)
        if tokens is None:
            text = render_prompt(self.tokenizer, record.prompt, self.thinking)
            tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if self.max_prompt_tokens is not None and len(tokens) > self.max_prompt_tokens:
                tokens = tokens[-self.max_prompt_tokens:]  # keep the end: the generation prompt must survive
            self._cache[record.prompt_id] = tokens
        return tokens
