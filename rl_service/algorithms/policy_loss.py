r"""Clipped-surrogate policy loss for GRPO and RAFT++ (ALGORITHMS.md §GRPO.3–6, §RAFT).

Per completion token t of sequence i (all quantities from the caller, see :func:`policy_loss`):

$$
\rho_t = \exp\big(\log\pi_\theta(y_t|\cdot) - \log\pi_{\text{old}}(y_t|\cdot)\big), \qquad
s_t = \min\big(\rho_t A_i,\ \text{clip}(\rho_t, 1-\epsilon_{\text{low}}, 1+\epsilon_{\text{high}})\, A_i\big)
$$

with the optional dual clip (A_i < 0 only): $s_t \leftarrow \max(s_t, c\,A_i)$ (§GRPO.3), and the
k3 KL estimator to the reference (§GRPO.4):

$$
q_t = \log\pi_{\text{ref}} - \log\pi_\theta, \qquad k3_t = e^{q_t} - q_t - 1
$$

optionally clamped to $[-v, v]$ (GVM runs, v = 10) and optionally multiplied by $\rho_t$ (TRL's
``use_bias_correction_kl``). Aggregation (§GRPO.5), with $m_{i,t}$ the completion mask:

$$
\text{token\_mean:}\quad \mathcal{L} = -\frac{\sum_{i,t} m_{i,t}\,(s_t - \beta\, k3_t)}{\sum_{i,t} m_{i,t}}
\qquad
\text{sequence\_mean:}\quad \mathcal{L} = -\frac{1}{|\{i\}|}\sum_i
\frac{\sum_t m_{i,t}\,(s_t - \beta\, k3_t)}{\sum_t m_{i,t}}
$$

and **prompt_mean** (ours, for GVM): a token mean within each prompt's group g, then a mean over the
P prompts of the mini-batch, $\mathcal{L} = -\frac{1}{P}\sum_g \frac{\sum_{i \in g,t} m_{i,t}(s_t - \beta k3_t)}
{\sum_{i \in g,t} m_{i,t}}$. Token and sequence means weight a prompt by its sample count, so an
allocation that gives a prompt more samples also gives it more weight: it changes *what* the batch
estimates, not only how noisily. Prompt-mean keeps every prompt's weight fixed, which is the
estimator whose variance §GVM.2 minimises (with `drop_rejected`, RAFT++'s per-prompt mean over the
accepted samples, exactly §GVM.2's). A prompt all of whose samples RAFT++ rejected has no row left,
but it is one of §GVM.2's B prompts (its gradient is 0, not absent): ``absent_prompts`` counts such
prompts in P. Pass ``sequence_weights=prompt_mean_weights(...)`` of the mini-batch; the normaliser is
then 1.

Gradient accumulation: pass ``loss_normalizer=loss_normalizer_for(minibatch_mask, aggregation)`` to
every micro-batch; the micro-batch losses (and gradients) then sum to the mini-batch loss exactly.
§GRPO.6 (π_old log-probs computed once per rollout batch, before the first update) is the
learner's job: ``old_logprobs`` are inputs here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PolicyLossConfig", "policy_loss", "loss_normalizer_for", "prompt_mean_weights", "AGGREGATIONS"]

AGGREGATIONS = ("token_mean", "sequence_mean", "prompt_mean")
# |log ρ| and |q| are bounded by this before exp (verl's value): e^20 ≈ 5e8 is far past any clip,
# and float32's exp overflows at 88.7.
LOG_RATIO_BOUND = 20.0


@dataclass
class PolicyLossConfig:
    """Options of the §GRPO clipped surrogate; defaults from ALGORITHMS.md §GRPO.3–5.

    Attributes:
        clip_low: ε_low, ratio lower bound 1 − ε_low (TRL ``epsilon``).
        clip_high: ε_high, ratio upper bound 1 + ε_high (DAPO clip-higher; TRL ``epsilon_high``).
        dual_clip: c > 1 bounding the per-token loss of negative-advantage tokens by −c·A (§GRPO.3;
            the GVM runs use 3.0), or None.
        kl_coef: β_kl (§GRPO.4); 0.0 means no reference model is needed.
        kl_clamp: clamp k3 to [−v, v] (the GVM runs use 10), or None.
        kl_bias_correction: multiply k3 by ρ_t (TRL ``use_bias_correction_kl``): same value at
            ρ = 1, different gradient.
        aggregation: "token_mean" (default; GRPO-DAPO and RAFT++), "sequence_mean" (original GRPO) or
            "prompt_mean" (ours: token mean per prompt, mean over prompts; see the module docstring).
    """

    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_clamp: float | None = None
    kl_bias_correction: bool = False
    aggregation: str = "token_mean"

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if not (0.0 <= self.clip_low < 1.0) or self.clip_high < 0.0:
            raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {self.clip_low}, {self.clip_high}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            # c <= 1 would clip below the unclipped surrogate even at ρ = 1 (verl asserts c > 1 too).
            raise ValueError(f"dual_clip must be > 1, got {self.dual_clip}")
        if self.kl_clamp is not None and self.kl_clamp <= 0.0:
            raise ValueError(f"kl_clamp must be > 0, got {self.kl_clamp}")


def loss_normalizer_for(completion_mask: Tensor, aggregation: str) -> float:
    """Denominator of the §GRPO.5 aggregation over a whole mini-batch.

    ``token_mean``: total completion tokens. ``sequence_mean``: number of sequences with at least one
    completion token (a fully masked row, e.g. a dropped sample, is not a sequence of the mini-batch;
    TRL's ``"grpo"`` still counts such rows in its ``.mean()``). Clamped to ≥ 1 so an empty
    mini-batch gives loss 0 rather than NaN.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    mask = completion_mask.to(torch.float64)
    if aggregation == "prompt_mean":
        return 1.0   # the weights (prompt_mean_weights) already divide by P and by each prompt's tokens
    if aggregation == "token_mean":
        total = mask.sum()
    else:
        total = (mask.sum(-1) > 0).sum().to(torch.float64)
    return max(float(total.item()), 1.0)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    config: PolicyLossConfig,
    ref_logprobs: Tensor | None = None,
    loss_normalizer: float | None = None,
    sequence_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped-surrogate loss ``L = −Σ m (s_t − β k3_t) / normalizer`` (ALGORITHMS.md §GRPO.3–5).

    RAFT++ (§RAFT) is this loss with ``advantages = raft_plus_plus_advantages(rewards)`` and
    token-mean aggregation.

    Args:
        logprobs: [B, T] log π_θ of the completion tokens (carries the gradient).
        old_logprobs: [B, T] log π_old (constant; detached here).
        advantages: [B] one per sequence, broadcast to its tokens (or [B, T]); detached here.
        completion_mask: [B, T], 1 on completion tokens, 0 on padding (bool or numeric).
        config: :class:`PolicyLossConfig`.
        ref_logprobs: [B, T] log π_ref; required iff ``config.kl_coef != 0``.
        loss_normalizer: replaces the local denominator (see :func:`loss_normalizer_for`) so that
            micro-batch losses sum to the mini-batch loss.
        sequence_weights: [B] per-sequence weights of the prompt_mean aggregation (required for it,
            from :func:`prompt_mean_weights` over the whole mini-batch).

    Returns:
        ``(loss, metrics)``; metrics are python floats over this call's completion tokens:
        ``clip_frac_low`` (ρ < 1 − ε_low with A < 0: the clip is active), ``clip_frac_high``
        (ρ > 1 + ε_high with A > 0), ``dual_clip_frac`` (A < 0 and ρ > c; only with dual clip),
        ``ratio_mean``, ``kl_k3_mean`` (the KL term as it enters the loss; only with ref_logprobs),
        ``loss`` and ``num_tokens``.
    """
    if logprobs.shape != old_logprobs.shape or logprobs.shape != completion_mask.shape or logprobs.dim() != 2:
        raise ValueError(
            f"logprobs, old_logprobs, completion_mask must all be [B, T]; got {tuple(logprobs.shape)}, "
            f"{tuple(old_logprobs.shape)}, {tuple(completion_mask.shape)}"
        )
    if config.kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    mask = completion_mask.to(logprobs.dtype)
    valid = completion_mask.bool()
    adv = advantages.detach().to(logprobs.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)  # [B, 1] broadcasts over tokens

    # §GRPO.3: per-token ratio and asymmetric clipped surrogate. Log-ratios are taken on completion
    # tokens only (torch.where, never `* mask`: a padding position holding -inf would turn 0·inf into
    # NaN in the loss and the gradient) and bounded to ±LOG_RATIO_BOUND before exp, as verl does, so a
    # far off-policy token cannot overflow float32 (the clip then holds its gradient at 0 anyway).
    log_ratio = torch.where(valid, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    clipped_ratio = torch.clamp(ratio, 1.0 - config.clip_low, 1.0 + config.clip_high)
    surrogate = torch.minimum(ratio * adv, clipped_ratio * adv)
    if config.dual_clip is not None:
        # For A < 0 the unclipped branch grows without bound as ρ → ∞; dual clip caps it at c·A.
        surrogate = torch.where(adv < 0, torch.maximum(surrogate, config.dual_clip * adv), surrogate)
    per_token_objective = surrogate

    # §GRPO.4: k3 estimator of KL(π_θ || π_ref).
    k3 = None
    if ref_logprobs is not None:
        q = torch.where(valid, ref_logprobs.detach() - logprobs, torch.zeros_like(logprobs))
        q = q.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        k3 = torch.exp(q) - q - 1.0
        if config.kl_clamp is not None:
            k3 = torch.clamp(k3, -config.kl_clamp, config.kl_clamp)
        if config.kl_bias_correction:
            k3 = k3 * ratio
        if config.kl_coef != 0.0:
            per_token_objective = per_token_objective - config.kl_coef * k3

    # §GRPO.5: aggregation.
    masked = torch.where(valid, per_token_objective, torch.zeros_like(per_token_objective))
    if config.aggregation == "prompt_mean":
        if sequence_weights is None or sequence_weights.shape != (mask.shape[0],):
            raise ValueError("prompt_mean aggregation needs sequence_weights of shape [B]")
        numerator = (masked.sum(-1) * sequence_weights.detach().to(masked.dtype)).sum()
    elif config.aggregation == "token_mean":
        numerator = masked.sum()
    else:
        numerator = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    denominator = loss_normalizer if loss_normalizer is not None else loss_normalizer_for(mask, config.aggregation)
    loss = -numerator / denominator

    metrics = _metrics(ratio, adv, mask, k3, config)
    metrics["loss"] = float(loss.detach().item())
    return loss, metrics


def prompt_mean_weights(completion_mask: Tensor, groups: Tensor, absent_prompts: float = 0.0) -> Tensor:
    """Per-sequence weights ``1 / (P · T_g)`` of the prompt_mean aggregation, float64 [B].

    ``groups[i]`` is sequence i's prompt; ``T_g`` the completion tokens of prompt g's sequences and
    ``P`` the prompts with at least one token within the given (mini-)batch, plus ``absent_prompts``:
    prompts of the batch whose samples were all dropped as rejected (RAFT++), which add a zero
    gradient but count in the mean over prompts (§GVM.2's 1/B). A sequence with no completion token
    gets weight 0.
    """
    tokens = completion_mask.to(torch.float64).sum(-1)
    _, group = torch.unique(groups, return_inverse=True)
    per_group = torch.zeros(int(group.max()) + 1 if group.numel() else 0, dtype=torch.float64)
    per_group.index_add_(0, group, tokens)
    prompts = int((per_group > 0).sum())
    if prompts == 0:
        return torch.zeros_like(tokens)
    group_tokens = per_group[group]
    return torch.where(group_tokens > 0, 1.0 / ((prompts + absent_prompts) * group_tokens.clamp(min=1.0)),
                       torch.zeros_like(tokens))


@torch.no_grad()
def _metrics(ratio: Tensor, adv: Tensor, mask: Tensor, k3: Tensor | None, config: PolicyLossConfig) -> dict[str, float]:
    """Token means over this call's completion tokens (same clip-region definitions as TRL)."""
    num_tokens = mask.sum()
    denom = num_tokens.clamp(min=1.0)

    def token_mean(x: Tensor) -> float:
        return float(((x.to(mask.dtype) * mask).sum() / denom).item())

    metrics = {
        "clip_frac_low": token_mean((ratio < 1.0 - config.clip_low) & (adv < 0)),
        "clip_frac_high": token_mean((ratio > 1.0 + config.clip_high) & (adv > 0)),
        "ratio_mean": token_mean(ratio),
        "num_tokens": float(num_tokens.item()),
    }
    if config.dual_clip is not None:
        metrics["dual_clip_frac"] = token_mean((ratio > config.dual_clip) & (adv < 0))
    if k3 is not None:
        metrics["kl_k3_mean"] = token_mean(k3)
    return metrics
