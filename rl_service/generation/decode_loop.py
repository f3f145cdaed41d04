"""Sampling completions with a decode loop of our own over any HF causal LM (the `torch` backend).

HF `generate` spends most of a small model's CPU time on work that does not change the samples:
it prefills a prompt once per sample, keeps finished rows in the batch until the longest one stops,
and grows a dynamic KV cache by concatenation every step. vLLM removes all three, at a per-token
scheduling cost of its own in Python. This loop removes them directly:
- each prompt is prefilled once, and its KV cache is copied to its samples (prefix sharing);
- the KV cache is preallocated for the whole generation and written in place (HF `StaticCache`);
- rows that have stopped leave the batch once a quarter of it has stopped (a compaction copies
  the cache of the rows still running; compacting every step would cost more than it saves).

What comes back per sample is what the learner needs: the completion token ids (through EOS when
it stopped), the behaviour log-probs log π_old(y_t) of the temperature-scaled distribution each
token was drawn from (top-p truncation not reflected, as in the HF and vLLM backends), and whether
it stopped. One `torch.Generator` seeded per call draws every token, so the same model, prompts
and seed give the same samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

COMPACT_WHEN_STOPPED = 0.25   # fraction of the running rows that must have stopped before a compaction


def _growing_cache(config, cache_length: int):
    """An HF `StaticCache` whose full-attention layers hand attention only the positions written so
    far: the buffers are preallocated all the same, but a step attends over its real length rather
    than the whole allocation (measured: attention was a third of a step). Other layer kinds
    (sliding windows, linear attention) keep HF's own static layers."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    class GrowingLayer(StaticLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            length = int(self.cumulative_length)
            return keys[:, :, :length], values[:, :, :length]

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return int(self.get_seq_length()) + query_length, 0

    cache = StaticCache(config=config, max_cache_len=cache_length)
    cache.layers = [GrowingLayer(cache_length) if type(layer) is StaticLayer else layer for layer in cache.layers]
    return cache


@dataclass
class Completions:
    token_ids: list[list[int]]        # per sample, in prompt order, samples of a prompt together
    logprobs: list[np.ndarray]        # float32, one per completion token
    finished: list[bool]              # stopped at EOS (else at the token limit)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, greedy: bool,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, log-probs of the temperature-scaled distribution at those tokens) for each row."""
    logprobs = torch.log_softmax(logits.float() / (1.0 if greedy else temperature), dim=-1)
    if greedy:
        tokens = logprobs.argmax(dim=-1)
    else:
        probs = logprobs.exp()
        if top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
            outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        # Inverse CDF: one uniform per row, the first token whose cumulative mass exceeds it (never
        # a token of zero mass). torch.multinomial's CPU kernel cost 4x as much per step.
        cumulative = probs.cumsum(dim=-1)
        uniform = torch.rand((probs.shape[0], 1), generator=generator, dtype=cumulative.dtype)
        tokens = torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True).squeeze(-1)
        tokens = tokens.clamp_(max=probs.shape[-1] - 1)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def sample_completions(model: torch.nn.Module, prompts: Sequence[Sequence[int]], samples: Sequence[int], *,
                       max_new_tokens: int, eos_token_id: int, pad_token_id: int, temperature: float = 1.0,
                       top_p: float = 1.0, greedy: bool = False, seed: int = 0) -> Completions:
    """`samples[i]` completions of `prompts[i]` each, at most `max_new_tokens` tokens long."""
    keep = [index for index, count in enumerate(samples) if count > 0]
    prompts, samples = [list(prompts[index]) for index in keep], [samples[index] for index in keep]
    rows_total = sum(samples)
    if rows_total == 0 or max_new_tokens <= 0:
        return Completions([[] for _ in range(rows_total)], [np.zeros(0, np.float32)] * rows_total, [False] * rows_total)
    generator = torch.Generator().manual_seed(int(seed))
    width = max(len(prompt) for prompt in prompts)
    cache_length = width + max_new_tokens
    device = next(model.parameters()).device

    # Left padding: every prompt ends at position `width - 1`, where generation starts.
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        prompt_mask[row, width - len(prompt):] = 1
    attention_mask = torch.cat([prompt_mask, torch.ones((len(prompts), max_new_tokens), dtype=torch.long)], dim=1)
    positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)

    cache = _growing_cache(model.config, cache_length)
    output = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                   position_ids=positions.to(device), past_key_values=cache,
                   cache_position=torch.arange(width, device=device), use_cache=True)
    # Every sample of a prompt starts from the prompt's cache and last logits.
    rows_of_prompt = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor(samples))
    cache.reorder_cache(rows_of_prompt.to(device))
    logits = output.logits[:, -1, :].index_select(0, rows_of_prompt.to(device))
    attention_mask = attention_mask.index_select(0, rows_of_prompt).to(device)
    next_position = positions[:, -1].index_select(0, rows_of_prompt).to(device) + 1

    tokens_out = torch.full((rows_total, max_new_tokens), pad_token_id, dtype=torch.long)
    logprobs_out = torch.zeros((rows_total, max_new_tokens), dtype=torch.float32)
    lengths = torch.full((rows_total,), max_new_tokens, dtype=torch.long)
    finished = torch.zeros(rows_total, dtype=torch.bool)
    running = torch.arange(rows_total)            # global row of each batch row
    stopped_in_batch = torch.zeros(rows_total, dtype=torch.bool)
    for step in range(max_new_tokens):
        tokens, logprobs = _sample(logits, temperature, top_p, greedy, generator)
        tokens, logprobs = tokens.cpu(), logprobs.cpu()
        live = ~stopped_in_batch
        live_rows = running[live]
        tokens_out[live_rows, step] = tokens[live]
        logprobs_out[live_rows, step] = logprobs[live]
        hit_eos = live & (tokens == eos_token_id)
        lengths[running[hit_eos]] = step + 1
        finished[running[hit_eos]] = True
        stopped_in_batch |= hit_eos
        if bool(stopped_in_batch.all()) or step + 1 == max_new_tokens:
            break
        if stopped_in_batch.float().mean() >= COMPACT_WHEN_STOPPED:
            keep_rows = (~stopped_in_batch).nonzero().squeeze(-1)
            cache.reorder_cache(keep_rows.to(device))
            running, tokens = running[keep_rows], tokens[keep_rows]
            attention_mask, next_position = attention_mask[keep_rows], next_position[keep_rows]
            stopped_in_batch = stopped_in_batch[keep_rows]
        output = model(input_ids=tokens.unsqueeze(-1).to(device), attention_mask=attention_mask,
                       position_ids=next_position.unsqueeze(-1), past_key_values=cache,
                       cache_position=torch.tensor([width + step], device=device), use_cache=True)
        logits = output.logits[:, -1, :]
        next_position = next_position + 1

    return Completions(
        token_ids=[tokens_out[row, :lengths[row]].tolist() for row in range(rows_total)],
        logprobs=[logprobs_out[row, :lengths[row]].numpy().copy() for row in range(rows_total)],
        finished=finished.tolist())
