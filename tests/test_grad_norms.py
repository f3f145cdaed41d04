"""ALGORITHMS.md §GVM.1: batched per-sample embedding-gradient norms equal one backward per sample."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from rl_service.algorithms.grad_norms import per_sample_embedding_grad_norms

PAD = 0
# (prompt, completion): repeated tokens inside and across prompt and completion; token 0 (= PAD) is
# also a real token of sample 2, so padding must be told apart by the attention mask, not the id.
SAMPLES = [
    ([5, 7, 5], [7, 7, 3, 5, 9, 7]),
    ([11, 2], [2, 2, 2, 40]),
    ([3, 0, 3, 8, 1], [0, 8, 8, 49, 3, 0, 8]),
    ([6, 6], [6, 6]),
]


def _batch(samples=SAMPLES):
    width = max(len(p) + len(c) for p, c in samples)
    input_ids = torch.full((len(samples), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    completion_mask = torch.zeros((len(samples), width - 1))
    for row, (prompt, completion) in enumerate(samples):
        length = len(prompt) + len(completion)
        input_ids[row, :length] = torch.tensor(prompt + completion)
        attention_mask[row, :length] = 1
        completion_mask[row, len(prompt) - 1:length - 1] = 1.0  # label t predicts input t + 1
    return input_ids, attention_mask, completion_mask


def _tiny_qwen2(tied: bool, dtype=torch.float64) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=64, tie_word_embeddings=tied, initializer_range=0.3)
    model = Qwen2ForCausalLM(config).to(dtype).eval()
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    return model


def _one_backward_per_sample(model, input_ids, attention_mask, completion_mask, temperature):
    """The §GVM.1 definition literally: each sample alone, unpadded, loss.backward(), ‖E.grad‖."""
    matrix = model.get_input_embeddings().weight
    norms = []
    for b in range(input_ids.shape[0]):
        length = int(attention_mask[b].sum())
        ids = input_ids[b:b + 1, :length]
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits[:, :-1].to(torch.float64) / temperature
        logp = F.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        loss = -(logp * completion_mask[b:b + 1, :length - 1].to(torch.float64)).sum()
        loss.backward()
        norms.append(matrix.grad.to(torch.float64).norm())
    model.zero_grad(set_to_none=True)
    return torch.stack(norms)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_batched_norms_equal_one_backward_per_sample(tied, temperature):
    model = _tiny_qwen2(tied)
    batch = _batch()
    forwards = []
    hook = model.model.register_forward_hook(lambda *args: forwards.append(1))
    norms = per_sample_embedding_grad_norms(model, *batch, temperature=temperature)
    hook.remove()
    assert len(forwards) == 1  # one forward for the whole batch
    assert all(p.grad is None for p in model.parameters())  # .grad untouched
    assert norms.shape == (4,) and norms.dtype == torch.float64
    expected = _one_backward_per_sample(model, *batch, temperature)
    assert (expected > 0).all()
    torch.testing.assert_close(norms, expected, rtol=1e-5, atol=0)


def test_tied_head_part_matters_and_override():
    model = _tiny_qwen2(tied=True)
    batch = _batch()
    with_head = per_sample_embedding_grad_norms(model, *batch)
    input_only = per_sample_embedding_grad_norms(model, *batch, tied=False)
    assert ((with_head - input_only).abs() > 1e-3 * with_head).all()


def test_float32_model_and_a_sample_without_completion():
    model = _tiny_qwen2(tied=True, dtype=torch.float32)
    input_ids, attention_mask, completion_mask = _batch()
    completion_mask[3] = 0.0
    norms = per_sample_embedding_grad_norms(model, input_ids, attention_mask, completion_mask, 1.3)
    expected = _one_backward_per_sample(model.double(), input_ids, attention_mask, completion_mask, 1.3)
    assert norms[3] == 0.0
    torch.testing.assert_close(norms[:3], expected[:3], rtol=1e-3, atol=0)


def test_rejects_bad_shapes_and_scaled_embeddings():
    model = _tiny_qwen2(tied=False)
    input_ids, attention_mask, completion_mask = _batch()
    with pytest.raises(ValueError, match="completion_mask"):
        per_sample_embedding_grad_norms(model, input_ids, attention_mask, completion_mask[:, :-1])
    with pytest.raises(ValueError, match="temperature"):
        per_sample_embedding_grad_norms(model, input_ids, attention_mask, completion_mask, 0.0)

    class ScaledEmbedding(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    scaled = ScaledEmbedding(50, 32).to(torch.float64)
    model.set_input_embeddings(scaled)
    with pytest.raises(NotImplementedError, match="plain row lookup"):
        per_sample_embedding_grad_norms(model, input_ids, attention_mask, completion_mask)
