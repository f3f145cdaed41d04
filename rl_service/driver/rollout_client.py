"""The driver's rollout client: send a batch to the generator pool and its samples on to the reward
actors, then collect the scores (DESIGN.md "One training step": generate → score).

Samples stay in the object store as shard references; the driver only ever holds the small
per-sample facts the reward actors return (`SCORED_KEYS` plus the reward counters). Training steps,
their extra rounds (`rl_service/driver/step_rounds.py`) and evaluations all go through `RolloutClient`.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from rl_service.rewards.verifiers import SCORE_COUNTER_KEYS as REWARD_COUNTER_KEYS
from rl_service.rollout import GenerationRequest, SamplingParams
from rl_service.tasks import PromptTokenizer

SCORED_KEYS = ("rewards", "request_index", "completion_lengths", "finished", "weight_versions")


def mean_or_nan(values) -> float:
    """Mean that is NaN (logged as null) for a step with no samples, without numpy's warning."""
    return float(np.mean(values)) if len(values) else float("nan")


def merge_scored(scored: dict, more: dict | None) -> dict:
    """Two rounds' scores as one, in sample order (their shards are appended in the same order)."""
    if more is None:
        return scored
    return {**{key: scored[key] + more[key] for key in SCORED_KEYS},
            **{key: scored[key] + more[key] for key in REWARD_COUNTER_KEYS}}


@dataclass
class PhaseTimer:
    """Wall seconds per phase of a step; `driver` is whatever the step spent outside them."""
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started


@dataclass
class LaunchedRollout:
    """A batch sent out and not yet collected: refs to its samples and to their scores."""
    records: list
    counts: list
    shard_refs: list
    score_refs: list
    sampler_state: dict | None = None   # data cursor right after this batch was drawn
    allocation_metrics: dict = field(default_factory=dict)   # spread of this batch's counts (§GVM)


def _plain(value):
    """`value` with numpy arrays and scalars as lists and Python numbers (JSON, and back exactly)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    return value


# A rollout's per-token fields: kept in a checkpoint as flat arrays plus row lengths (safetensors), not
# as JSON numbers (about 20 bytes a float32 log-prob, for every token of every sample in flight).
TOKEN_FIELDS = {"prompt_token_ids": np.int64, "completion_token_ids": np.int64, "behaviour_logprobs": np.float32}


def rollout_state(shard, key: str, arrays: dict[str, np.ndarray]) -> dict:
    """`shard`'s small fields as JSON-able data; its per-token fields flattened into `arrays` under `key`."""
    state = {name: _plain(getattr(shard, name)) for name in shard.__dataclass_fields__ if name not in TOKEN_FIELDS}
    for name, dtype in TOKEN_FIELDS.items():
        rows = getattr(shard, name)
        arrays[f"{key}.{name}"] = (np.concatenate([np.asarray(row, dtype=dtype) for row in rows]) if rows
                                   else np.zeros(0, dtype=dtype))
        arrays[f"{key}.{name}.lengths"] = np.asarray([len(row) for row in rows], dtype=np.int64)
    return state


def rollout_from_state(state: dict, key: str, arrays: dict[str, np.ndarray]):
    """The Rollout `rollout_state` kept, exactly: token ids as lists of ints, log-probs as float32 arrays."""
    from rl_service.rollout import Rollout

    fields = dict(state)
    for name, dtype in TOKEN_FIELDS.items():
        values, lengths = arrays[f"{key}.{name}"], arrays[f"{key}.{name}.lengths"]
        rows = np.split(values, np.cumsum(lengths)[:-1]) if len(lengths) else []
        fields[name] = [row.astype(dtype) if dtype is np.float32 else row.tolist() for row in rows]
    return Rollout(**fields)


def launched_state(launched: LaunchedRollout, key: str, arrays: dict[str, np.ndarray]) -> dict:
    """A launched batch, waited for, as JSON-able data plus per-token `arrays` (under `key`): what a
    checkpoint keeps of a rollout still in flight (async mode), since it was sampled with weights the
    checkpoint no longer holds."""
    import ray

    shards = ray.get(launched.shard_refs)
    return {"prompt_ids": [record.prompt_id for record in launched.records], "counts": _plain(launched.counts),
            "sampler_state": launched.sampler_state, "allocation_metrics": _plain(launched.allocation_metrics),
            "shards": [rollout_state(shard, f"{key}.{index}", arrays) for index, shard in enumerate(shards)],
            "scores": _plain(ray.get(launched.score_refs))}


def launched_from_state(state: dict, records_by_id: dict, key: str, arrays: dict[str, np.ndarray]) -> LaunchedRollout:
    """The launched batch `launched_state` kept, its samples and scores back in the object store."""
    import ray

    shards = [rollout_from_state(shard, f"{key}.{index}", arrays) for index, shard in enumerate(state["shards"])]
    return LaunchedRollout([records_by_id[prompt_id] for prompt_id in state["prompt_ids"]], state["counts"],
                           [ray.put(shard) for shard in shards], [ray.put(part) for part in state["scores"]],
                           state["sampler_state"], state["allocation_metrics"])


class RolloutClient:
    """Both job kinds' way to the pool and the reward actors: RL steps and their extra rounds, the
    preference step (reasoning on and off in one batch, §BVPO.2), and every evaluation."""

    def __init__(self, roles, tokenizer, thinking: bool, max_prompt_tokens, pipelined: bool):
        self.roles = roles
        self.pipelined = pipelined
        self.thinking = thinking
        self.tokenizer, self.max_prompt_tokens = tokenizer, max_prompt_tokens
        # One cache per split (and reasoning mode): JSONL train and eval files number their prompts
        # independently, so a shared cache keyed by prompt id would serve a train prompt's tokens
        # for an eval prompt.
        self.prompt_tokens: dict[tuple[str, bool], PromptTokenizer] = {}

    def _tokenizer(self, split: str, thinking: bool) -> PromptTokenizer:
        key = (split, thinking)
        if key not in self.prompt_tokens:
            self.prompt_tokens[key] = PromptTokenizer(self.tokenizer, thinking, self.max_prompt_tokens)
        return self.prompt_tokens[key]

    def launch(self, records, counts, sampling: SamplingParams, seed: int, timer: PhaseTimer,
               split: str = "train", thinking: list[bool] | None = None, with_prompts: bool = False) -> LaunchedRollout:
        """Send `counts[i]` samples of `records[i]` to the pool and on to the reward actors; wait for
        neither. A sample's request index is its record's position in `records`. `thinking[i]`:
        record i's reasoning mode (default: the model's setting); `with_prompts`: the reward actors
        get the prompts' text (a reward model scores prompt + completion)."""
        import ray

        modes = thinking if thinking is not None else [self.thinking] * len(records)
        # A prompt allocated no samples (GVM) is not sent; request_index keeps its batch position.
        requests = [GenerationRequest(index, record.prompt_id, self._tokenizer(split, mode)(record), count)
                    for index, (record, count, mode) in enumerate(zip(records, counts, modes)) if count > 0]
        if not requests:  # every prompt was allocated 0 samples: nothing to generate or score
            return LaunchedRollout(records, counts, [], [])
        with timer.phase("generate"):
            # Async mode splits evenly over engines whatever they still run, so a run replays bit for bit.
            shard_refs = ray.get(self.roles.pool.generate.remote(requests, sampling, seed, self.pipelined))
        answers = [record.answer for record in records]
        prompts = [record.prompt for record in records] if with_prompts else None
        # Contiguous groups of shards per reward actor keep the concatenation in sample order; each
        # actor fetches its shards itself as they finish.
        groups = np.array_split(np.arange(len(shard_refs)), min(len(self.roles.rewards), len(shard_refs)))
        # Evaluation keeps the verifier, so eval_accuracy stays an accuracy under a custom reward.
        score_refs = [actor.score.remote([shard_refs[k] for k in group], answers, prompts, verifier_only=split == "eval")
                      for actor, group in zip(self.roles.rewards, groups)]
        return LaunchedRollout(records, counts, shard_refs, score_refs)

    @staticmethod
    def collect(launched: LaunchedRollout, timer: PhaseTimer):
        """Wait for a launched batch: its shard refs and the scores of its samples, in sample order."""
        import ray

        if not launched.shard_refs:
            return [], {**{key: [] for key in SCORED_KEYS}, **dict.fromkeys(REWARD_COUNTER_KEYS, 0)}
        with timer.phase("generate"):
            ray.wait(launched.shard_refs, num_returns=len(launched.shard_refs), fetch_local=False)
        with timer.phase("reward"):
            parts = ray.get(launched.score_refs)
        scored = {key: [item for part in parts for item in part[key]] for key in SCORED_KEYS}
        scored.update({key: sum(part[key] for part in parts) for key in REWARD_COUNTER_KEYS})
        return launched.shard_refs, scored

    def rollout(self, records, counts, sampling: SamplingParams, seed: int, timer: PhaseTimer, split: str = "train",
                thinking: list[bool] | None = None, with_prompts: bool = False):
        """`launch` then `collect`: (shard refs, scores in sample order)."""
        return self.collect(self.launch(records, counts, sampling, seed, timer, split, thinking, with_prompts), timer)
