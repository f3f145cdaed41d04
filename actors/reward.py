"""RewardActor: scores rollouts with the configured verifier, a custom reward function (in a
subprocess, rl_service/rewards/custom.py) or a reward model (BVPO ranking), batched."""
from __future__ import annotations

import time

import ray

from actors.process import configure_process
from rl_service.rewards.custom import CustomRewardRunner, CustomRewardSpec
from rl_service.rewards.verifiers import SCORE_COUNTER_KEYS, clip_rewards, score_batch_counted
from rl_service.rollout import Rollout


@ray.remote
class RewardActor:
    def __init__(self, verifier: str, timeout_s: float, torch_threads: int | None = None,
                 reward_model_path: str | None = None, reward_model_batch_size: int = 32,
                 custom: CustomRewardSpec | None = None, clip: tuple[float, float] = (-1e6, 1e6)):
        configure_process(1)
        self.verifier = verifier
        self.timeout_s = timeout_s
        self.clip = clip     # reward.clip: a custom function's or reward model's reward stays in range
        self.reward_model = None
        if reward_model_path is not None:
            from rl_service.rewards.reward_model import RewardModelScorer

            self.reward_model = RewardModelScorer(reward_model_path, batch_size=reward_model_batch_size)
        # Started now so the user module's import is not billed to the first step's reward time.
        self.custom = CustomRewardRunner(custom) if custom is not None else None

    def score(self, shard_refs: list[ray.ObjectRef], answers: list[str], prompts: list[str] | None = None,
              verifier_only: bool = False) -> dict:
        """Rewards in sample order plus the small per-sample facts the driver logs.

        `answers[i]` is the gold answer of request i; shards are fetched here, not in the driver.
        With `prompts` (`prompts[i]`: the user text of request i) an actor holding a reward model
        scores prompt + completion with it instead of the verifier (ALGORITHMS.md §BVPO.1). Else a
        custom reward function, when configured, replaces the verifier unless `verifier_only`
        (evaluation: accuracy stays the verifier's). `custom_reward_errors` / `_timeouts` count this
        call's completions that scored 0 because the custom function failed (0 without one).
        """
        rollout = Rollout.concat(ray.get(shard_refs))
        started = time.perf_counter()
        gold = [answers[index] for index in rollout.request_index]
        counts = dict.fromkeys(SCORE_COUNTER_KEYS, 0)
        if prompts is not None and self.reward_model is not None:
            rewards = self.reward_model.score([prompts[index] for index in rollout.request_index], rollout.completion_texts)
            rewards, counts["rewards_clipped"] = clip_rewards(rewards, *self.clip)
        elif self.custom is not None and not verifier_only:
            rewards, custom_counts = self.custom.score(rollout.completion_texts, gold)
            counts.update(custom_counts)
            rewards, counts["rewards_clipped"] = clip_rewards(rewards, *self.clip)
        else:
            rewards, counts["verifier_timeouts"] = score_batch_counted(rollout.completion_texts, gold, self.verifier,
                                                                       self.timeout_s)
        return {
            "rewards": rewards,
            "request_index": rollout.request_index,
            "completion_lengths": [len(tokens) for tokens in rollout.completion_token_ids],
            "finished": rollout.finished,
            "weight_versions": rollout.weight_versions,
            "verify_seconds": time.perf_counter() - started,
            **counts,
        }
