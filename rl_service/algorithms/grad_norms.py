r"""Per-sample gradient norms with respect to the token-embedding matrix, ALGORITHMS.md §GVM.1.

For sample b with completion mask m_b, the §GVM.1 statistic is

$$
G_b = \big\| \nabla_E \big( -\textstyle\sum_t m_{b,t} \log \pi_\theta(y_t \mid \cdot) \big) \big\|_2,
$$

E the token-embedding matrix [V, D]; the loss is summed over tokens, not averaged. One forward and
one ``torch.autograd.grad`` serve the whole batch: sequences do not interact in a forward pass, so
the gradient of the *summed* loss with respect to sample b's activations is sample b's own
gradient. From it, E's gradient of sample b is

* input part: the embedding-output gradient of each position, added into the row of its token
  (a repeated token adds up before squaring): ``S_b = Σ_t onehot(x_t) g_t`` (rows used only);
* output-head part, only when the head *is* E (``tie_word_embeddings``, §GVM.1 last sentence):
  ``A_b = dZ_bᵀ H_b`` ([V, D]), dZ the logit gradient and H the head input on completion positions.

``‖A_b + S_b‖² = ‖A_b‖² + 2⟨A_b, S_b⟩ + ‖S_b‖²`` with ``‖A_b‖² = Σ (dZ dZᵀ) ∘ (H Hᵀ)`` (Gram matrices
over completion positions) and ``⟨A_b, S_b⟩`` needing only the rows used, so no dense [V, D] matrix is
ever built. Model parameters' ``.grad`` are left untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rl_service.algorithms.logprobs import token_log_probs

__all__ = ["per_sample_embedding_grad_norms"]


def _same_matrix(a: Tensor, b: Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.data_ptr() == b.data_ptr() and a.stride() == b.stride())


def _check_shapes(input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> None:
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be [B, L], got "
                         f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
    batch, length = input_ids.shape
    if completion_mask.shape != (batch, length - 1):
        raise ValueError(f"completion_mask must be [B, L-1] = [{batch}, {length - 1}] (aligned with "
                         f"labels input_ids[:, 1:]), got {tuple(completion_mask.shape)}")


def per_sample_embedding_grad_norms(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    *,
    tied: bool | None = None,
) -> Tensor:
    """``G_b = ‖∇_E (−Σ_t log π_θ(y_t|·))‖₂`` for every sample of a batch, ALGORITHMS.md §GVM.1.

    One forward pass and one ``torch.autograd.grad``, never a backward per sample (see module doc).

    Args:
        model: a causal LM called as ``model(inputs_embeds=..., attention_mask=...)`` (e.g. a
            transformers ``Qwen2ForCausalLM``) whose input embedding is a plain row lookup of
            ``model.get_input_embeddings().weight``. Put it in eval mode (or use no dropout) if the
            norms must be deterministic; its mode and parameters' ``.grad`` are not touched.
        input_ids: [B, L] prompt + completion token ids, right-padded.
        attention_mask: [B, L], 1 on real tokens.
        completion_mask: [B, L−1], aligned with the labels ``input_ids[:, 1:]``, 1 on completion labels
            (the layout of :mod:`rl_service.training.batch`). Only these tokens enter the loss.
        temperature: τ of ``log softmax(logits / τ)``, the sampling temperature (> 0).
        tied: whether the output head shares E (its gradient then joins E's, §GVM.1). ``None``:
            detect it, ``model.get_output_embeddings().weight`` being the very same tensor as E.

    Returns:
        [B] float64 norms on ``input_ids``' device (0 for a sample without completion tokens).
        Computed in float64 for a float64 model, else in float32 and summed in float64.
    """
    _check_shapes(input_ids, attention_mask, completion_mask)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    embedding = model.get_input_embeddings()
    matrix = embedding.weight
    head = model.get_output_embeddings()
    if tied is None:
        tied = head is not None and _same_matrix(head.weight, matrix)
    if tied and head is None:
        raise ValueError("tied=True but the model has no output embedding (head) module")

    # Read E before any module runs: under ZeRO-3 the modules' hooks may release (re-partition) it.
    width, compute = matrix.shape[1], torch.float64 if matrix.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        plain_lookup = F.embedding(input_ids, matrix)
        lookup = embedding(input_ids)
        if not torch.equal(lookup, plain_lookup):
            raise NotImplementedError("the input embedding is not a plain row lookup of its weight "
                                      "(e.g. a scaled embedding): §GVM.1 gradients would need its chain rule")
    embeds = lookup.detach().requires_grad_(True)  # leaf: its gradient is the per-position input part

    captured: dict[str, Tensor] = {}

    def capture_head(module, args, output):  # keeps the last call: head input H and logits Z
        captured["hidden"], captured["logits"] = args[0], output

    handle = head.register_forward_hook(capture_head) if tied else None
    try:
        with torch.enable_grad():
            logits = model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits
            if tied and "logits" not in captured:
                raise RuntimeError("tied output head was never called: cannot capture its input and logits")
            logp_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
            logp = token_log_probs(logits[:, :-1], input_ids[:, 1:], temperature, out_dtype=logp_dtype)
            loss = -(logp * completion_mask.to(logp_dtype)).sum()  # one sum: samples stay separable
            wrt = [embeds, captured["logits"]] if tied else [embeds]
            grads = torch.autograd.grad(loss, wrt)
    finally:
        if handle is not None:
            handle.remove()

    grad_embeds = grads[0]
    norms = torch.zeros(input_ids.shape[0], dtype=torch.float64, device=input_ids.device)
    with torch.no_grad():
        for b in range(input_ids.shape[0]):
            real = attention_mask[b].bool()
            rows, inverse = torch.unique(input_ids[b][real], return_inverse=True)
            input_part = torch.zeros(rows.numel(), width, dtype=compute, device=input_ids.device)
            input_part.index_add_(0, inverse, grad_embeds[b][real].to(compute))  # repeated tokens add up
            squared = input_part.double().square().sum()
            if tied:
                positions = (completion_mask[b] != 0).nonzero().squeeze(-1)  # logit t predicts label t
                grad_logits = grads[1][b, positions].to(compute)  # [T_c, V]
                hidden = captured["hidden"][b, positions].detach().to(compute)  # [T_c, D]
                head_squared = ((grad_logits @ grad_logits.T) * (hidden @ hidden.T)).double().sum()
                head_rows = grad_logits[:, rows].T @ hidden  # A_b restricted to the rows S_b uses
                cross = (head_rows * input_part).double().sum()
                squared = squared + head_squared + 2.0 * cross
            norms[b] = squared.clamp_min(0.0).sqrt()
    return norms
