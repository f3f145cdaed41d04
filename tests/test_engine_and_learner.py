"""The HF and torch generation engines and the DeepSpeed learner in-process, on the shipped tiny model."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from rl_service.algorithms.logprobs import token_log_probs
from rl_service.config import load_config
from rl_service.data.arithmetic import make_arithmetic_split
from rl_service.rollout import GenerationRequest, SamplingParams
from rl_service.tasks import PromptTokenizer
from rl_service.data.prompts import PromptRecord


@pytest.fixture(scope="module", params=["hf", "torch"])
def engine(request):
    """HF `generate` (the reference) and our own decode loop over the same model: both must give
    per-prompt counts, seeded replay and behaviour log-probs equal to a teacher-forced forward."""
    from rl_service.generation.hf_engine import HFGenerationEngine
    from rl_service.generation.torch_engine import TorchGenerationEngine

    return (HFGenerationEngine if request.param == "hf" else TorchGenerationEngine)("builtin")


@pytest.fixture(scope="module")
def requests(engine):
    train, _ = make_arithmetic_split(seed=5, num_train=6, num_eval=1, levels=[1, 2, 3])
    tokenize = PromptTokenizer(engine.tokenizer, thinking=True)
    counts = [3, 1, 4, 2, 0, 5]
    return [GenerationRequest(k, p.prompt_id, tokenize(PromptRecord(p.prompt_id, p.question, p.answer)), n)
            for k, (p, n) in enumerate(zip(train, counts))]


def test_per_prompt_counts_and_seeded_reproducibility(engine, requests):
    sampling = SamplingParams(temperature=1.0, max_new_tokens=40)
    first = engine.generate(requests, sampling, seed=11)
    assert first.request_index == [0] * 3 + [1] + [2] * 4 + [3] * 2 + [5] * 5
    again = engine.generate(requests, sampling, seed=11)
    assert again.completion_token_ids == first.completion_token_ids
    other = engine.generate(requests, sampling, seed=12)
    assert other.completion_token_ids != first.completion_token_ids
    for tokens, logprobs, finished in zip(first.completion_token_ids, first.behaviour_logprobs, first.finished):
        assert len(tokens) == len(logprobs) and len(tokens) <= 40
        assert finished == (tokens[-1] == engine.eos_token_id)
        assert np.all(logprobs <= 0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_match_a_teacher_forced_forward(engine, requests, temperature):
    rollout = engine.generate(requests, SamplingParams(temperature=temperature, max_new_tokens=40), seed=3)
    with torch.no_grad():
        for k in range(len(rollout)):
            prompt, completion = rollout.prompt_token_ids[k], rollout.completion_token_ids[k]
            ids = torch.tensor([prompt + completion])
            logits = engine.model(input_ids=ids).logits[:, :-1]
            reference = token_log_probs(logits.double(), ids[:, 1:], temperature=temperature)[0, len(prompt) - 1:]
            np.testing.assert_allclose(rollout.behaviour_logprobs[k], reference.numpy(), atol=1e-4)


def test_weight_load_sets_version_and_refuses_to_go_back(engine):
    from rl_service.weights.flat import flatten_named_tensors

    model = copy.deepcopy(engine.model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)
    assert engine.load_weights(flatten_named_tensors(model.named_parameters(), version=2)) == 2
    for (name, a), (_, b) in zip(model.named_parameters(), engine.model.named_parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="backwards"):
        engine.load_weights(flatten_named_tensors(model.named_parameters(), version=1))


def _learner(micro_batch_size: int, zero_stage: int = 0, extra=()):
    from rl_service.training.policy_learner import PolicyLearner

    config = load_config(None, [f"learner.micro_batch_size={micro_batch_size}", f"learner.zero_stage={zero_stage}",
                                "learner.lr=1e-3", *extra])
    return PolicyLearner(config)


def test_micro_batching_gives_the_full_batch_update(requests):
    """Gradient accumulation over micro-batches of 3 equals one pass over the whole batch."""
    from rl_service.generation.hf_engine import HFGenerationEngine

    rollout = HFGenerationEngine("builtin").generate(requests, SamplingParams(max_new_tokens=32), seed=1)
    rewards = [float(k % 3 == 0) for k in range(len(rollout))]
    results = []
    # Micro-batches grouped by length (the default) and in sample order must both give the full batch's update.
    for micro_batch_size, stage, grouped in ((64, 0, True), (3, 0, True), (3, 1, True), (3, 0, False)):
        learner = _learner(micro_batch_size, stage, [f"learner.group_by_length={grouped}"])
        metrics = learner.train_step(rollout, rewards)
        results.append((metrics, {n: p.detach().clone() for n, p in learner.engine.module.named_parameters()}))
    (full_metrics, full), *others = results
    assert full_metrics["grad_norm"] > 0
    grouped_padding, ungrouped_padding = others[0][0]["padding_fraction"], others[2][0]["padding_fraction"]
    assert 0.0 <= grouped_padding <= ungrouped_padding < 1.0
    for metrics, params in others:
        assert metrics["loss"] == pytest.approx(full_metrics["loss"], abs=1e-6)
        assert metrics["grad_norm"] == pytest.approx(full_metrics["grad_norm"], rel=1e-4)
        _assert_same_update(params, full, lr=1e-3)


def _assert_same_update(params: dict, reference: dict, lr: float) -> None:
    """Adam's first step moves each weight by lr·g/(|g| + eps): for a weight whose gradient is near
    fp32 rounding (~1e-9, below eps = 1e-8) summation order alone can shift that step by up to
    lr·0.5. Loss and gradient norm are the sharp checks; this one catches a wrong set of samples or
    tokens, which would move most weights differently: at most 0.1% of the weights of any tensor may
    differ by more than 1e-5 (seen: 1 of 16,384), and none by more than lr."""
    for name, value in params.items():
        difference = (value - reference[name]).abs()
        assert float(difference.max()) <= lr, name
        assert float((difference > 1e-5).float().mean()) <= 1e-3, name


def test_stale_samples_take_the_ratio_against_their_behaviour_logprobs(requests):
    """Async mode: a sample from an older weight version gets ρ = π_θ / π_behaviour (§GRPO.3), a sample
    from the current version ρ = 1 on the first update, as in sync mode."""
    from rl_service.generation.hf_engine import HFGenerationEngine

    rollout = HFGenerationEngine("builtin").generate(requests, SamplingParams(max_new_tokens=24), seed=3)
    rewards = [float(k % 2 == 0) for k in range(len(rollout))]
    shift = 0.5   # behaviour log-probs 0.5 below the learner's: ρ = e^0.5 on every stale token
    stale = copy.deepcopy(rollout)
    stale.behaviour_logprobs = [np.asarray(logprobs) - shift for logprobs in stale.behaviour_logprobs]

    learner = _learner(64)
    learner.flat_weights(version=1)       # the learner is one version ahead of the samples (version 0)
    stale_metrics = learner.train_step(stale, rewards)
    assert stale_metrics["stale_sample_fraction"] == 1.0
    assert stale_metrics["ratio_mean"] == pytest.approx(np.exp(shift), rel=1e-3)
    # ρ = 1.65 > 1 + ε_high: the clip holds every positive-advantage token.
    assert stale_metrics["clip_frac_high"] > 0

    fresh = copy.deepcopy(stale)
    fresh.weight_versions = [1] * len(fresh)
    learner = _learner(64)
    learner.flat_weights(version=1)
    fresh_metrics = learner.train_step(fresh, rewards)
    assert fresh_metrics["stale_sample_fraction"] == 0.0
    assert fresh_metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert fresh_metrics["clip_frac_high"] == 0.0


@pytest.mark.parametrize("extra", [[], ["learner.mini_batches=2", "learner.ppo_epochs=2"],
                                   ["algorithm.aggregation=sequence_mean"]])
def test_skipping_zero_advantage_samples_leaves_the_update_unchanged(requests, extra):
    """Samples of a group whose rewards are all equal have A = 0: skipping their forward/backward gives
    the same loss, gradient and weights as computing them (they stay in the §GRPO.5 normaliser)."""
    from rl_service.generation.hf_engine import HFGenerationEngine

    rollout = HFGenerationEngine("builtin").generate(requests, SamplingParams(max_new_tokens=24), seed=5)
    # Groups 0 and 2 all wrong / all right (A = 0); the others have a spread.
    rewards = [0.0 if index == 0 else 1.0 if index == 2 else float(k % 2)
               for k, index in enumerate(rollout.request_index)]
    results = {}
    for skip in (True, False):
        learner = _learner(4, extra=[f"learner.skip_zero_advantage={skip}", *extra])
        metrics = learner.train_step(rollout, rewards)
        results[skip] = metrics, {n: p.detach().clone() for n, p in learner.engine.module.named_parameters()}
    (skipped, skipped_params), (full, full_params) = results[True], results[False]
    assert skipped["forward_sample_fraction"] < 1.0 == full["forward_sample_fraction"]
    assert skipped["loss"] == pytest.approx(full["loss"], abs=1e-7)
    assert skipped["grad_norm"] == pytest.approx(full["grad_norm"], rel=1e-5)
    _assert_same_update(skipped_params, full_params, lr=1e-3)
