"""The reference generation backend: Hugging Face `generate` on a local model.

Returns, for every sample, the completion token ids (through EOS when it stopped), the behaviour
log-probs `log π_old(y_t)` of the temperature-scaled policy the tokens were drawn from (as TRL and
verl define π_old; top-p truncation is not reflected), and the weight version that produced it.
Every call is seeded, so the same requests, weights and seed give the same samples on CPU.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from rl_service.models.loading import load_causal_lm, load_tokenizer
from rl_service.rollout import GenerationRequest, Rollout, SamplingParams
from rl_service.weights.flat import FlatWeights, copy_into_, load_flat_weights_


class HFGenerationEngine:
    def __init__(self, model_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                 max_rows_per_forward: int = 512):
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.model = load_causal_lm(model_path, dtype, trust_remote_code).eval()
        self.weight_version = 0
        self.max_rows_per_forward = max_rows_per_forward
        self.eos_token_id = self.tokenizer.eos_token_id
        self.pad_token_id = self.tokenizer.pad_token_id

    def load_weights(self, flat: FlatWeights | Sequence[FlatWeights]) -> int:
        """One version, as one flat buffer or as its buckets (all loaded before the version changes)."""
        buckets = list(flat) if isinstance(flat, (list, tuple)) else [flat]
        version = buckets[0].version
        self._check_version(version)
        self._own_weights()
        load_flat_weights_(self.model, buckets)
        self.weight_version = version
        return self.weight_version

    @torch.no_grad()
    def load_shared_weights(self, named_tensors: Sequence[tuple[str, torch.Tensor]], version: int,
                            share: bool = True) -> bool:
        """One version as read-only views of the node's weight mailbox (rl_service/weights/shared_memory.py).
        With `share`, and where every parameter is a CPU tensor of the views' dtype and shape, the
        parameters become the views: no copy, and the engines of a node hold one copy of the weights.
        Otherwise they are copied. Returns whether the model now serves from the views."""
        self._check_version(version)
        parameters = dict(self.model.named_parameters())
        shareable = share and len(named_tensors) == len(parameters) and all(
            name in parameters and parameters[name].device.type == "cpu" and parameters[name].dtype == tensor.dtype
            and parameters[name].shape == tensor.shape for name, tensor in named_tensors)
        if shareable:
            for name, tensor in named_tensors:
                parameters[name].data = tensor
        else:
            self._own_weights()
            missing = [name for name, _ in named_tensors if name not in parameters]
            if missing:
                raise KeyError(f"published weights name parameters the model lacks: {missing[:5]}")
            for name, tensor in named_tensors:
                copy_into_(parameters[name], tensor)
        self.shares_weights = shareable
        self.weight_version = version
        return shareable

    shares_weights = False   # whether the parameters are views of a weight mailbox (read-only memory)

    def _own_weights(self) -> None:
        """Give the parameters memory of their own again before copying into them (a mailbox view
        is read-only, and its slot will be overwritten by a later version)."""
        if self.shares_weights:
            for parameter in self.model.parameters():
                parameter.data = parameter.data.clone()
            self.shares_weights = False

    def _check_version(self, version: int) -> None:
        if version < self.weight_version:
            raise ValueError(f"weight version went backwards: {version} < {self.weight_version}")

    weight_group_size = 1   # one process: one member of the collective weight group

    def join_weight_group(self, master_addr: str, master_port: int, first_rank: int, world_size: int,
                          device: str, timeout_s: float) -> None:
        from rl_service.weights.collective import WeightBroadcastGroup

        self.weight_group = WeightBroadcastGroup(master_addr, master_port, first_rank, world_size, device, timeout_s)

    @torch.no_grad()
    def receive_weights(self, layouts: Sequence, version: int) -> int:
        """Receive every bucket of `version` from learner rank 0 and copy it into the model in place."""
        self._check_version(version)
        self._own_weights()
        parameters = dict(self.model.named_parameters())
        for bucket in self.weight_group.receive(layouts):
            for name, tensor in bucket:
                copy_into_(parameters[name], tensor)
        self.weight_version = version
        return self.weight_version

    @torch.no_grad()
    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams, seed: int) -> Rollout:
        rows = [(request, request.prompt_token_ids) for request in requests for _ in range(request.num_samples)]
        parts = []
        for start in range(0, len(rows), self.max_rows_per_forward):
            chunk = rows[start:start + self.max_rows_per_forward]
            parts.append(self._generate_rows(chunk, sampling, seed + start))
        return Rollout.concat(parts)

    def _generate_rows(self, rows, sampling: SamplingParams, seed: int) -> Rollout:
        prompt_lengths = [len(tokens) for _, tokens in rows]
        width = max(prompt_lengths)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (_, tokens) in enumerate(rows):  # left padding: every row ends where generation starts
            input_ids[row, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
            attention_mask[row, width - len(tokens):] = 1
        torch.manual_seed(seed)
        sample_kwargs = {} if sampling.greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
        output = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=not sampling.greedy,
            max_new_tokens=sampling.max_new_tokens, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
            output_logits=True, return_dict_in_generate=True, **sample_kwargs)
        generated = output.sequences[:, width:]
        # Raw logits of each step, scaled as the sampler scaled them: log π_old of the drawn token.
        logits = torch.stack(output.logits, dim=1).float()
        temperature = 1.0 if sampling.greedy else sampling.temperature
        logprobs = torch.log_softmax(logits / temperature, dim=-1).gather(-1, generated.unsqueeze(-1)).squeeze(-1)

        rollout = Rollout()
        for row, (request, tokens) in enumerate(rows):
            completion = generated[row].tolist()
            finished = self.eos_token_id in completion
            length = completion.index(self.eos_token_id) + 1 if finished else len(completion)
            self._append_sample(rollout, request, completion[:length],
                                logprobs[row, :length].numpy().astype(np.float32), finished)
        return rollout

    def _append_sample(self, rollout: Rollout, request: GenerationRequest, completion: list[int],
                       logprobs: np.ndarray, finished: bool) -> None:
        rollout.request_index.append(request.request_index)
        rollout.prompt_token_ids.append(request.prompt_token_ids)
        rollout.completion_token_ids.append(completion)
        rollout.behaviour_logprobs.append(logprobs)
        # Keep <think>/</think> (they may be special tokens): verifiers find the answer after them.
        text_tokens = completion[:-1] if finished else completion
        rollout.completion_texts.append(self.tokenizer.decode(text_tokens, skip_special_tokens=False))
        rollout.finished.append(finished)
        rollout.weight_versions.append(self.weight_version)

