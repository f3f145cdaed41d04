"""Our decode loop (rl_service/generation/decode_loop.py) against independent references: HF
`generate` for greedy decoding (left padding, prefix sharing, the static cache and compaction all
have to be right for the tokens to agree), the model's own softmax for the sampler's frequencies,
and the nucleus for top-p."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rl_service.generation.decode_loop import sample_completions


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from rl_service.models.loading import load_causal_lm, load_tokenizer

    return load_causal_lm("builtin", "float32", False).eval(), load_tokenizer("builtin", False)


@pytest.fixture(scope="module")
def prompts(model_and_tokenizer):
    from rl_service.data.arithmetic import make_arithmetic_split
    from rl_service.data.prompts import PromptRecord
    from rl_service.tasks import PromptTokenizer

    _, tokenizer = model_and_tokenizer
    train, _ = make_arithmetic_split(seed=9, num_train=12, num_eval=1, levels=[1, 2, 3, 4, 5])
    tokenize = PromptTokenizer(tokenizer, thinking=True)
    return [tokenize(PromptRecord(p.prompt_id, p.question, p.answer)) for p in train]


def _kwargs(tokenizer, **extra):
    return dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)


def test_greedy_decoding_equals_hf_generate_with_prompts_of_different_lengths(model_and_tokenizer, prompts):
    model, tokenizer = model_and_tokenizer
    assert len({len(prompt) for prompt in prompts}) > 1   # left padding is exercised
    ours = sample_completions(model, prompts, [2] * len(prompts), max_new_tokens=48, greedy=True,
                              **_kwargs(tokenizer))
    for index, prompt in enumerate(prompts):
        with torch.no_grad():
            reference = model.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=48,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        expected = reference[0, len(prompt):].tolist()
        assert ours.token_ids[2 * index] == ours.token_ids[2 * index + 1] == expected, index
        assert ours.finished[2 * index] == (expected[-1] == tokenizer.eos_token_id)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.6, 1.0), (1.3, 0.8)])
def test_behaviour_logprobs_are_the_scaled_distributions_through_compactions(model_and_tokenizer, prompts,
                                                                            temperature, top_p):
    """64 rows of very different lengths: rows stop and the batch compacts several times; every
    token's log-prob is still the teacher-forced one of the temperature-scaled model (float64)."""
    model, tokenizer = model_and_tokenizer
    counts = [8, 1, 0, 7, 6, 2, 5, 4, 9, 3, 10, 9]
    out = sample_completions(model, prompts, counts, max_new_tokens=40, temperature=temperature, top_p=top_p,
                             seed=4, **_kwargs(tokenizer))
    assert len(out.token_ids) == sum(counts)
    lengths = {len(tokens) for tokens in out.token_ids}
    assert len(lengths) > 5 and any(out.finished) and max(lengths) <= 40
    row = 0
    for prompt, count in zip(prompts, counts):
        for _ in range(count):
            completion, logprobs = out.token_ids[row], out.logprobs[row]
            assert len(logprobs) == len(completion) and out.finished[row] == (completion[-1] == tokenizer.eos_token_id)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].double()
            scaled = torch.log_softmax(logits[len(prompt) - 1:-1] / temperature, dim=-1)
            reference = scaled.gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1).numpy()
            np.testing.assert_allclose(logprobs, reference, atol=1e-4)
            row += 1
    again = sample_completions(model, prompts, counts, max_new_tokens=40, temperature=temperature, top_p=top_p,
                               seed=4, **_kwargs(tokenizer))
    assert again.token_ids == out.token_ids


def _uncertain_context(model, tokenizer, prompt) -> list[int]:
    """The prompt plus the start of a greedy completion, up to the position where the model is
    least sure of the next token (the first token after a prompt is nearly certain)."""
    greedy = sample_completions(model, [prompt], [1], max_new_tokens=24, greedy=True, **_kwargs(tokenizer))
    context = prompt + greedy.token_ids[0]
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([context])).logits[0].double(), dim=-1)
    entropy = -(probs * probs.clamp(min=1e-300).log()).sum(-1)[len(prompt) - 1:]
    return context[:len(prompt) + int(entropy.argmax())]


def test_tokens_are_drawn_with_the_models_probabilities(model_and_tokenizer, prompts):
    """4000 draws at one uncertain position against the softmax: each likely token's frequency
    within 4.5 standard errors (a false alarm about once in 10^4 runs; seeded, so it never flakes)."""
    model, tokenizer = model_and_tokenizer
    context = _uncertain_context(model, tokenizer, prompts[0])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context])).logits[0, -1].double()
    probs = torch.softmax(logits / 1.2, dim=-1).numpy()
    draws = 4000
    out = sample_completions(model, [context], [draws], max_new_tokens=1, temperature=1.2, seed=7,
                             **_kwargs(tokenizer))
    counts = np.bincount([tokens[0] for tokens in out.token_ids], minlength=len(probs))
    # Tokens expected at least 20 times each are checked alone, the rest as one bin (the normal
    # approximation behind the bound needs expected counts of that size).
    likely = probs * draws >= 20
    bins = np.append(probs[likely], probs[~likely].sum())
    observed = np.append(counts[likely], counts[~likely].sum()) / draws
    standard_error = np.sqrt(bins * (1 - bins) / draws)
    assert np.all(np.abs(observed - bins) <= 4.5 * standard_error)
    assert likely.sum() >= 3   # several likely tokens are checked, not one


def test_top_p_draws_only_from_the_nucleus(model_and_tokenizer, prompts):
    model, tokenizer = model_and_tokenizer
    prompt = _uncertain_context(model, tokenizer, prompts[1])
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].double() / 2.0, dim=-1)
    ordered, order = probs.sort(descending=True)
    top_p = 0.5
    nucleus = set(order[:int((ordered.cumsum(0) - ordered < top_p).sum())].tolist())
    out = sample_completions(model, [prompt], [2000], max_new_tokens=1, temperature=2.0, top_p=top_p, seed=3,
                             **_kwargs(tokenizer))
    drawn = {tokens[0] for tokens in out.token_ids}
    assert drawn <= nucleus and len(drawn) == len(nucleus) > 1


def test_no_samples_and_zero_counts_give_empty_results(model_and_tokenizer, prompts):
    model, tokenizer = model_and_tokenizer
    empty = sample_completions(model, prompts[:2], [0, 0], max_new_tokens=8, **_kwargs(tokenizer))
    assert empty.token_ids == [] and empty.finished == []
    one = sample_completions(model, prompts[:3], [0, 2, 0], max_new_tokens=8, seed=1, **_kwargs(tokenizer))
    assert len(one.token_ids) == 2


def test_the_torch_engine_batches_rows_and_keeps_request_order():
    from rl_service.generation.torch_engine import TorchGenerationEngine
    from rl_service.rollout import SamplingParams
    from conftest import arithmetic_requests

    engine = TorchGenerationEngine("builtin", max_rows_per_forward=6)
    requests = arithmetic_requests(5, 4, seed=3)
    rollout = engine.generate(requests, SamplingParams(max_new_tokens=12), seed=2)
    assert rollout.request_index == [k for k in range(5) for _ in range(4)]
    assert all(prompt == requests[k].prompt_token_ids for k, prompt in zip(rollout.request_index, rollout.prompt_token_ids))
    greedy = engine.generate(requests, SamplingParams(temperature=0.0, max_new_tokens=12), seed=2)
    for k in range(5):
        assert len({tuple(tokens) for i, tokens in zip(greedy.request_index, greedy.completion_token_ids) if i == k}) == 1
    # The pool hands an engine step_seed × 1_000_003 + shard (about 2**51 for a large run seed): the
    # engine's own ×1_000_003 once overflowed torch's 64-bit seed. Same seed, same samples still.
    huge = (2**31 - 2) * 1_000_003 + 7
    first = engine.generate(requests, SamplingParams(max_new_tokens=12), seed=huge)
    assert first.completion_token_ids == engine.generate(requests, SamplingParams(max_new_tokens=12),
                                                         seed=huge).completion_token_ids


def _tiny_models():
    """Random tiny models of other families: rotary with grouped KV heads (Llama), a sliding window
    shorter than prompt + completion (Mistral: HF's own sliding static layers stay in place), and
    learned absolute positions (GPT-2: the left-padding position ids must be right)."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM)

    shared = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    return {"llama": lambda: LlamaForCausalLM(LlamaConfig(**shared)),
            "mistral-sliding-window": lambda: MistralForCausalLM(MistralConfig(**shared, sliding_window=8)),
            "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=128))}


@pytest.mark.parametrize("family", sorted(_tiny_models()))
def test_greedy_decoding_equals_hf_generate_for_other_model_families(family):
    torch.manual_seed(0)
    model = _tiny_models()[family]().eval()
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
    ours = sample_completions(model, prompts, [1, 2, 1], max_new_tokens=20, greedy=True, eos_token_id=1, pad_token_id=0)
    expected = []
    for prompt in prompts:
        with torch.no_grad():
            output = model.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=20,
                                    eos_token_id=1, pad_token_id=0)
        expected.append(output[0, len(prompt):].tolist())
    assert ours.token_ids == [expected[0], expected[1], expected[1], expected[2]]
