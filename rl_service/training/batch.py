"""Turn a rollout into padded training tensors.

Sequences are prompt + completion, right-padded. Positions are those of the *labels*
(`input_ids[:, 1:]`), so `completion_mask[b, t]` marks label t as a completion token of sample b and
per-token log-probs, behaviour log-probs and masks all share one [N, L−1] layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rl_service.rollout import Rollout


@dataclass
class TrainingBatch:
    input_ids: torch.Tensor          # [N, L] long
    attention_mask: torch.Tensor     # [N, L] long
    completion_mask: torch.Tensor    # [N, L-1] float, 1 on completion labels
    behaviour_logprobs: torch.Tensor # [N, L-1] float32, 0 off the completion
    advantages: torch.Tensor         # [N] float32
    weight_versions: torch.Tensor    # [N] long, the policy version that sampled each row

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor | slice) -> "TrainingBatch":
        picked = TrainingBatch(*(getattr(self, name)[rows] for name in self.__dataclass_fields__))
        # Trim columns that are padding in every selected row: micro-batches stay as short as they can.
        width = int(picked.attention_mask.sum(dim=1).max()) if len(picked) else 1
        return TrainingBatch(picked.input_ids[:, :width], picked.attention_mask[:, :width],
                             picked.completion_mask[:, :width - 1], picked.behaviour_logprobs[:, :width - 1],
                             picked.advantages, picked.weight_versions)


def micro_batches(batch: TrainingBatch, rows: torch.Tensor, micro_size: int, group_by_length: bool) -> list[torch.Tensor]:
    """Row indices of each micro-batch of `rows` (a mini-batch).

    Grouped by length, longest first: `select` trims each micro-batch to its own longest row, so
    rows of similar length share one width and little compute goes to padding (on the built-in
    task, sequences average ~45 tokens while a batch's longest is ~80). The mini-batch, its loss
    normaliser and so its gradient are the same either way; only the summation order changes.
    """
    if group_by_length and len(rows) > micro_size:
        lengths = batch.attention_mask[rows].sum(dim=1)
        rows = rows[torch.sort(lengths, descending=True, stable=True).indices]
    return [chunk for chunk in torch.split(rows, micro_size) if len(chunk)]   # no rows: no micro-batch


def build_training_batch(rollout: Rollout, advantages: torch.Tensor, keep: torch.Tensor, pad_token_id: int) -> TrainingBatch:
    rows = [k for k in range(len(rollout)) if bool(keep[k])]
    lengths = [len(rollout.prompt_token_ids[k]) + len(rollout.completion_token_ids[k]) for k in rows]
    width = max(lengths, default=2)
    count = len(rows)
    input_ids = torch.full((count, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((count, width), dtype=torch.long)
    completion_mask = torch.zeros((count, width - 1), dtype=torch.float32)
    behaviour = torch.zeros((count, width - 1), dtype=torch.float32)
    for row, k in enumerate(rows):
        prompt, completion = rollout.prompt_token_ids[k], rollout.completion_token_ids[k]
        length = len(prompt) + len(completion)
        input_ids[row, :length] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[row, :length] = 1
        # Label position t predicts input position t+1: the completion's labels start at len(prompt)-1.
        first, last = len(prompt) - 1, length - 1
        completion_mask[row, first:last] = 1.0
        behaviour[row, first:last] = torch.as_tensor(np.array(rollout.behaviour_logprobs[k], dtype=np.float32))
    picked = torch.tensor(rows, dtype=torch.long)
    versions = torch.tensor(rollout.weight_versions, dtype=torch.long) if rollout.weight_versions else torch.zeros(len(rollout), dtype=torch.long)
    return TrainingBatch(input_ids, attention_mask, completion_mask, behaviour,
                         advantages[picked].float() if rows else torch.zeros(0), versions[picked])
