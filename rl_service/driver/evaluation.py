"""Evaluation of a model directory in this process (no Ray): `rl-service eval`. Greedy accuracy, and
pass@k / mean@k when `eval.samples` is set (rl_service/pass_at_k.py). `accuracy_by_group` is also
the training loop's (rl_service/driver/trainer.py)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from rl_service.config import JobConfig
from rl_service.rewards.verifiers import score_batch
from rl_service.rollout import GenerationRequest, SamplingParams
from rl_service.tasks import PromptTokenizer, load_task


def accuracy_by_group(task, rewards, request_index) -> dict[str, float]:
    """`eval_accuracy_<group>` per eval group (e.g. each difficulty level of the built-in task):
    `rewards[j]` of the sample of eval record `request_index[j]`."""
    by_group: dict[str, list[float]] = defaultdict(list)
    for index, reward in zip(request_index, rewards):
        group = task.eval_groups.get(task.eval[index].prompt_id)
        if group is not None:
            by_group[group].append(float(reward))
    return {f"eval_accuracy_{group}": float(np.mean(values)) for group, values in sorted(by_group.items())}


def evaluate_model_dir(config: JobConfig, adapter: Path | None = None) -> dict[str, float]:
    """Greedy (and, with eval.samples, sampled) accuracy of `config.model.path` on the eval split;
    `adapter`: a LoRA checkpoint's adapter/, merged into that base first."""
    from rl_service.generation.hf_engine import HFGenerationEngine

    task = load_task(config)
    if not task.eval:
        return {}
    engine = HFGenerationEngine(config.model.path, config.model.dtype, config.model.trust_remote_code)
    if adapter is not None:
        from rl_service.training.lora import with_saved_adapter_merged

        engine.model = with_saved_adapter_merged(engine.model, adapter).eval()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=config.generator.max_new_tokens)

    def greedy_rewards(thinking: bool):
        prompt_tokens = PromptTokenizer(engine.tokenizer, thinking)
        requests = [GenerationRequest(index, record.prompt_id, prompt_tokens(record), 1)
                    for index, record in enumerate(task.eval)]
        rollout = engine.generate(requests, greedy, seed=config.seed)
        answers = [task.eval[index].answer for index in rollout.request_index]
        return requests, rollout, np.asarray(score_batch(rollout.completion_texts, answers, task.verifier))

    requests, rollout, rewards = greedy_rewards(True if config.algorithm.is_preference else config.model.thinking)
    metrics = {"eval_accuracy": float(rewards.mean()), "eval_prompts": float(len(rewards))}
    metrics.update(accuracy_by_group(task, rewards, rollout.request_index))
    if config.algorithm.is_preference:
        # As a DPO/BVPO run evaluates (PreferenceTrainer.evaluate): both reasoning modes, and their mean
        # as eval_accuracy, so this figure and the run's summary are the same measure.
        off = float(greedy_rewards(False)[2].mean())
        metrics.update(eval_accuracy_reasoning_on=metrics["eval_accuracy"], eval_accuracy_reasoning_off=off,
                       eval_accuracy=(metrics["eval_accuracy"] + off) / 2)
    samples = config.eval.samples
    if samples is not None:
        from rl_service.pass_at_k import sampled_eval_metrics

        sampled_requests = [GenerationRequest(index, request.prompt_id, request.prompt_token_ids, samples)
                            for index, request in enumerate(requests)]
        sampling = SamplingParams(temperature=config.eval.temperature, top_p=config.eval.top_p,
                                  max_new_tokens=config.generator.max_new_tokens)
        sampled = engine.generate(sampled_requests, sampling, seed=config.seed + 1)
        sampled_rewards = score_batch(sampled.completion_texts, [task.eval[i].answer for i in sampled.request_index],
                                      task.verifier)
        metrics.update(sampled_eval_metrics(sampled_rewards, sampled.request_index, len(task.eval), samples))
    return metrics
