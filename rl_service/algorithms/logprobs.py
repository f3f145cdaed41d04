"""Per-token log-probabilities of given labels, without materialising a full-precision log-softmax.

ALGORITHMS.md (Notation): token log-probabilities are taken on completion tokens only; masking is the
caller's job (``completion_mask`` in :func:`rl_service.algorithms.policy_loss.policy_loss`).

Memory: a [B, T, V] log-softmax in float32 of a bf16 model output is 2× the logits, and autograd would
keep it alive until backward. Instead we use ``log p(y) = z_y / τ − logsumexp(z / τ)`` one sequence at
a time (peak extra memory: one [T, V] row in the compute dtype), save only the logits (already alive)
and the [B, T] logsumexp for backward, and recompute the softmax row by row in backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["token_log_probs"]


def _compute_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    # Low-precision logits (bf16/fp16) are upcast to float32 per row; float64 stays float64 so that
    # float64 reference tests can check the formula to ~1e-12.
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def _scaled_row(row: Tensor, cdt: torch.dtype, temperature: float) -> Tensor:
    # copy=True: the in-place ops below must never write into the caller's logits (``.to`` is a no-op
    # when the dtype already matches). Upcast before dividing so bf16 rounding happens only once.
    scaled = row.to(cdt, copy=True)
    return scaled.div_(temperature) if temperature != 1.0 else scaled


class _TokenLogProbs(torch.autograd.Function):
    """log softmax(logits / τ) gathered at labels, with a row-wise recomputing backward.

    Gradient: for ``ℓ_t = z_{t,y_t}/τ − logsumexp_v(z_{t,v}/τ)``,
    ``∂ℓ_t/∂z_{t,v} = (1[v = y_t] − softmax(z_t/τ)_v) / τ``.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, valid: Tensor, temperature: float) -> Tensor:
        cdt = _compute_dtype(logits.dtype)
        batch, seq_len = labels.shape
        out = torch.empty(batch, seq_len, dtype=cdt, device=logits.device)
        lse = torch.empty(batch, seq_len, dtype=cdt, device=logits.device)
        for b in range(batch):  # one [T, V] upcast copy alive at a time
            row = _scaled_row(logits[b], cdt, temperature)
            lse[b] = torch.logsumexp(row, dim=-1)
            out[b] = row.gather(-1, labels[b].unsqueeze(-1)).squeeze(-1) - lse[b]
        out = out.masked_fill(~valid, 0.0)
        ctx.save_for_backward(logits, labels, valid, lse)
        ctx.temperature = temperature
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, labels, valid, lse = ctx.saved_tensors
        temperature = ctx.temperature
        cdt = lse.dtype
        grad_out = grad_out.to(cdt).masked_fill(~valid, 0.0)
        grad_logits = torch.empty_like(logits)
        for b in range(labels.shape[0]):
            probs = _scaled_row(logits[b], cdt, temperature).sub_(lse[b].unsqueeze(-1)).exp_()
            grad_row = probs.mul_(-grad_out[b].unsqueeze(-1))
            grad_row.scatter_add_(-1, labels[b].unsqueeze(-1), grad_out[b].unsqueeze(-1))
            grad_logits[b] = (grad_row / temperature).to(logits.dtype)
        return grad_logits, None, None, None


def token_log_probs(
    logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    *,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Return ``log softmax(logits / temperature)[b, t, labels[b, t]]`` as a [B, T] tensor.

    Args:
        logits: [B, T, V], aligned so that ``logits[:, t]`` predicts ``labels[:, t]`` (the caller shifts
            the model output by one position). Any float dtype; bf16/fp16 are upcast row by row.
        labels: [B, T] token ids. Negative ids (e.g. ``-100`` padding) are allowed: their log-prob is
            0.0 and they receive no gradient; they must also be masked out by the caller.
        temperature: the sampling temperature the completions were generated with, so that the
            learner's π_θ is the distribution the sampler drew from (τ > 0).
        out_dtype: dtype of the result (float32 by default; float64 for reference tests).

    Differentiable w.r.t. ``logits`` (first-order only).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    labels = labels.long()
    valid = labels >= 0
    safe_labels = labels.clamp(min=0)
    return _TokenLogProbs.apply(logits, safe_labels, valid, float(temperature)).to(out_dtype)
