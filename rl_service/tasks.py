"""What a job trains on: prompt records for train and eval, the verifier, and prompt token ids.

Everything here runs in the driver before Ray starts, so a bad dataset or model directory is
reported (one line, exit 2) before any actor is placed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rl_service.config import JobConfig
from rl_service.data.arithmetic import make_arithmetic_split
from rl_service.data.prompts import PromptRecord, load_prompt_file
from rl_service.errors import DataError, UserError
from rl_service.models.loading import check_weights_match_config, model_context_length, render_prompt
from rl_service.rewards.custom import check_custom_reward, custom_reward_spec


@dataclass
class TaskData:
    train: list[PromptRecord]
    eval: list[PromptRecord]
    verifier: str                                   # "integer" | "math"
    eval_groups: dict[int, str] = field(default_factory=dict)  # eval prompt id -> group name (difficulty level)
    max_prompt_tokens: int | None = None            # data.long_prompts=truncate: prompts are cut to this


def load_task(config: JobConfig) -> TaskData:
    data = config.data
    if data.source == "arithmetic":
        train_problems, eval_problems = make_arithmetic_split(
            config.seed, data.arithmetic.num_train, data.arithmetic.num_eval, data.arithmetic.levels)

        def to_record(problem):
            return PromptRecord(problem.prompt_id, problem.question, problem.answer, group=f"level_{problem.level}")

        train = [to_record(problem) for problem in train_problems]
        evaluation = [to_record(problem) for problem in eval_problems]
        default_verifier = "integer"
    elif data.source == "hf":
        from rl_service.data.hf_datasets import load_hf_split

        integer = config.reward.verifier == "integer"   # a gold answer it cannot read is refused, naming the row
        train = load_hf_split(data.hf, data.hf.train_split, "data.hf.train_split", integer and not config.reward.custom)
        evaluation = (load_hf_split(data.hf, data.hf.eval_split, "data.hf.eval_split", integer)
                      if data.hf.eval_split else [])
        default_verifier = "math"
    else:
        integer = config.reward.verifier == "integer"   # a gold answer it cannot read is refused, naming the line
        # A custom reward scores the train split instead of the verifier: its answers are the reward's to read.
        train = load_prompt_file(data.train_path, data.group_field, integer and not config.reward.custom)
        evaluation = load_prompt_file(data.eval_path, data.group_field, integer) if data.eval_path else []
        default_verifier = "math"
    groups = {record.prompt_id: record.group for record in evaluation if record.group is not None}
    if data.eval_limit is not None:
        evaluation = evaluation[:data.eval_limit]
    verifier = default_verifier if config.reward.verifier == "auto" else config.reward.verifier
    custom = custom_reward_spec(config.reward)
    if custom is not None:  # replaces the verifier in training; checked here so a bad file fails before Ray
        check_custom_reward(custom)
    return TaskData(train=train, eval=evaluation, verifier=verifier, eval_groups=groups)


# No token of a real vocabulary spans more characters than this: a prompt longer than the token budget
# times it cannot fit, and is refused (or cut) without tokenizing megabytes.
_MAX_CHARS_PER_TOKEN = 64


def check_job_inputs(config: JobConfig, task: TaskData, tokenizer) -> None:
    """What would fail only inside the run, checked before Ray starts: the weights against the
    model's config, a batch the train split can fill, and every prompt (train and eval) against
    the model's context with `generator.max_new_tokens` (refused, or `data.long_prompts: truncate`)."""
    model = check_weights_match_config(config.model.path, config.model.trust_remote_code)
    if config.learner.lora is not None:
        from rl_service.training.lora import check_targets

        check_targets(model, config.learner.lora)
    if config.data.prompts_per_step > len(task.train):
        raise DataError(f"data.prompts_per_step: {config.data.prompts_per_step} but the train split has "
                        f"{len(task.train)} prompts (a batch lists each prompt once)")
    context = model_context_length(config.model.path, config.model.trust_remote_code)
    if context is None:
        return
    max_new = config.generator.max_new_tokens
    budget = context - max_new
    if budget < 1:
        raise UserError(f"generator.max_new_tokens: {max_new} leaves no room for a prompt in the model's "
                        f"{context}-position context (max_position_embeddings in {config.model.path}/config.json)")
    if config.data.long_prompts == "truncate":
        task.max_prompt_tokens = budget
        return
    modes = _reasoning_modes(config)
    overhead = max(len(tokenizer(render_prompt(tokenizer, "", thinking), add_special_tokens=False)["input_ids"])
                   for thinking in modes)
    source = ({"train": config.data.train_path, "eval": config.data.eval_path} if config.data.source == "jsonl" else
              {"train": f"{config.data.hf.path} [{config.data.hf.train_split}]",
               "eval": f"{config.data.hf.path} [{config.data.hf.eval_split}]"} if config.data.source == "hf" else {})
    for split, records in (("train", task.train), ("eval", task.eval)):
        for record in records:
            # Each token is at least one byte: a prompt within the budget in bytes fits untokenized.
            text = _prompt_text(record)
            if overhead + len(text.encode("utf-8")) <= budget:
                continue
            length = (None if len(text) > budget * _MAX_CHARS_PER_TOKEN else
                      max(len(tokenizer(render_prompt(tokenizer, record.prompt, thinking, record.messages),
                                        add_special_tokens=False, verbose=False)["input_ids"]) for thinking in modes))
            if length is None or length > budget:
                size = f"{len(text)} characters" if length is None else f"{length} tokens"
                raise DataError(f"{source.get(split, 'data.arithmetic')}: {split} prompt id {record.prompt_id} is {size}, "
                                f"more than the {budget} the model's {context}-position context leaves beside "
                                f"generator.max_new_tokens {max_new} (shorten it or set data.long_prompts: truncate)")


def _reasoning_modes(config: JobConfig) -> tuple[bool, ...]:
    """The chat-template modes prompts are rendered in: preference jobs sample with reasoning on, and
    BVPO with it off too (rl_service/driver/preference_loop.py); RL jobs in `model.thinking`."""
    if config.algorithm.is_preference:
        return (True, False) if config.algorithm.name == "bvpo" else (True,)
    return (config.model.thinking,)


def _prompt_text(record: PromptRecord) -> str:
    """Every character the template wraps: the user message, or all of a chat's messages (its
    per-message markup is counted in tokens when the prompt is near the budget)."""
    return record.prompt if record.messages is None else "".join(content for _, content in record.messages)


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
            prompt = record.prompt
            if self.max_prompt_tokens is not None and record.messages is None:   # cut megabytes before tokenizing
                prompt = prompt[-self.max_prompt_tokens * _MAX_CHARS_PER_TOKEN:]
            text = render_prompt(self.tokenizer, prompt, self.thinking, record.messages)
            tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if self.max_prompt_tokens is not None and len(tokens) > self.max_prompt_tokens:
                tokens = tokens[-self.max_prompt_tokens:]  # keep the end: the generation prompt must survive
            self._cache[record.prompt_id] = tokens
        return tokens
