"""ALGORITHMS.md §GRPO.3–5 policy loss and token log-probs against hand-computed float64 values."""

from __future__ import annotations

import math

import pytest
import torch

from rl_service.algorithms.logprobs import token_log_probs
from rl_service.algorithms.policy_loss import PolicyLossConfig, loss_normalizer_for, policy_loss

F64 = torch.float64


def _hand_batch():
    """Seq 0 (A = +1): ratios 0.5, 1.5 + two padding tokens. Seq 1 (A = −2): ratios 0.5, 1.1, 1.5, 4.0.

    Per-token surrogate s = min(ρA, clip(ρ, 0.8, 1.28)A):
      seq 0: ρ=0.5 → min(0.5, 0.8) = 0.5 ; ρ=1.5 → min(1.5, 1.28) = 1.28 (high clip)
      seq 1: ρ=0.5 → min(−1.0, −1.6) = −1.6 (low clip) ; ρ=1.1 → −2.2 ; ρ=1.5 → min(−3.0, −2.56) = −3.0 ;
             ρ=4.0 → min(−8.0, −2.56) = −8.0, dual clip c=3: max(−8.0, −6.0) = −6.0
    """
    ratios = torch.tensor([[0.5, 1.5, 3.0, 0.1], [0.5, 1.1, 1.5, 4.0]], dtype=F64)  # 3.0, 0.1 are padding
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.7, -1.2, -2.5, -4.0]], dtype=F64)
    logprobs = (old + torch.log(ratios)).requires_grad_(True)
    adv = torch.tensor([1.0, -2.0], dtype=F64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    return logprobs, old, adv, mask


@pytest.mark.parametrize(
    "aggregation,dual_clip,expected_loss",
    [
        ("token_mean", None, -(0.5 + 1.28 - 1.6 - 2.2 - 3.0 - 8.0) / 6),
        ("token_mean", 3.0, -(0.5 + 1.28 - 1.6 - 2.2 - 3.0 - 6.0) / 6),
        ("sequence_mean", None, -((0.5 + 1.28) / 2 + (-1.6 - 2.2 - 3.0 - 8.0) / 4) / 2),
        ("sequence_mean", 3.0, -((0.5 + 1.28) / 2 + (-1.6 - 2.2 - 3.0 - 6.0) / 4) / 2),
    ],
)
def test_hand_computed_clip_regions(aggregation, dual_clip, expected_loss):
    logprobs, old, adv, mask = _hand_batch()
    config = PolicyLossConfig(dual_clip=dual_clip, aggregation=aggregation)
    loss, metrics = policy_loss(logprobs, old, adv, mask, config)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-12)
    assert metrics["clip_frac_low"] == pytest.approx(1 / 6)
    assert metrics["clip_frac_high"] == pytest.approx(1 / 6)
    assert metrics["ratio_mean"] == pytest.approx((0.5 + 1.5 + 0.5 + 1.1 + 1.5 + 4.0) / 6)
    assert metrics["num_tokens"] == 6.0 and metrics["loss"] == pytest.approx(expected_loss)
    assert ("dual_clip_frac" in metrics) == (dual_clip is not None)
    if dual_clip is not None:
        assert metrics["dual_clip_frac"] == pytest.approx(1 / 6)


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_hand_computed_gradient_token_mean(dual_clip):
    # d s/d logprob = ρA on the active unclipped branch, 0 where a clip (or dual clip) is active.
    logprobs, old, adv, mask = _hand_batch()
    loss, _ = policy_loss(logprobs, old, adv, mask, PolicyLossConfig(dual_clip=dual_clip))
    loss.backward()
    last = 0.0 if dual_clip else -8.0
    expected = -torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.0, -2.2, -3.0, last]], dtype=F64) / 6
    torch.testing.assert_close(logprobs.grad, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("kl_clamp", [None, 10.0])
def test_hand_computed_k3_kl(kl_clamp, bias_correction):
    # A = 0 and ρ = 1, so the loss is the KL term only: L = β Σ k3 / 3, q = ref − logprob = 0.5, −1, 3.
    beta = 0.1
    q = [0.5, -1.0, 3.0]
    k3 = [math.exp(0.5) - 1.5, math.exp(-1.0), math.exp(3.0) - 4.0]  # 0.1487…, 0.3679…, 16.0855…
    if kl_clamp is not None:
        k3[2] = 10.0
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]], dtype=F64, requires_grad=True)
    ref = logprobs.detach() + torch.tensor([q], dtype=F64)
    config = PolicyLossConfig(kl_coef=beta, kl_clamp=kl_clamp, kl_bias_correction=bias_correction)
    loss, metrics = policy_loss(logprobs, logprobs.detach(), torch.zeros(1, dtype=F64), torch.ones(1, 3), config, ref)
    assert loss.item() == pytest.approx(beta * sum(k3) / 3, abs=1e-12)
    assert metrics["kl_k3_mean"] == pytest.approx(sum(k3) / 3, abs=1e-12)
    loss.backward()
    # d k3/d logprob = 1 − e^q (0 where clamped); bias correction adds k3 · dρ/d logprob = k3 at ρ = 1.
    d_k3 = [1 - math.exp(v) for v in q]
    if kl_clamp is not None:
        d_k3[2] = 0.0
    expected = [beta / 3 * (d + (k if bias_correction else 0.0)) for d, k in zip(d_k3, k3)]
    torch.testing.assert_close(logprobs.grad, torch.tensor([expected], dtype=F64), rtol=0, atol=1e-12)


def _loop_reference_loss(lp, old, adv, mask, config: PolicyLossConfig, ref=None, normalizer=None):
    """Token-by-token statement of §GRPO.3–5 with python branches (float64 scalars, autograd-able)."""
    lo, hi = 1 - config.clip_low, 1 + config.clip_high
    total, tokens, per_sequence, sequences = 0.0, 0, 0.0, 0
    for b in range(lp.shape[0]):
        seq_sum, seq_tokens = 0.0, 0
        for t in range(lp.shape[1]):
            if not mask[b, t]:
                continue
            a = float(adv[b])
            rho = torch.exp(lp[b, t] - old[b, t])
            clipped_rho = lo if rho < lo else hi if rho > hi else rho
            s = rho * a if rho * a <= clipped_rho * a else clipped_rho * a
            if config.dual_clip is not None and a < 0 and s < config.dual_clip * a:
                s = config.dual_clip * a
            if config.kl_coef:
                q = ref[b, t] - lp[b, t]
                k3 = torch.exp(q) - q - 1
                if config.kl_clamp is not None and k3 > config.kl_clamp:
                    k3 = k3 * 0 + config.kl_clamp
                if config.kl_bias_correction:
                    k3 = k3 * rho
                s = s - config.kl_coef * k3
            seq_sum, seq_tokens = seq_sum + s, seq_tokens + 1
        total, tokens = total + seq_sum, tokens + seq_tokens
        if seq_tokens:
            per_sequence, sequences = per_sequence + seq_sum / seq_tokens, sequences + 1
    if config.aggregation == "token_mean":
        return -total / (normalizer or tokens)
    return -per_sequence / (normalizer or sequences)


def _random_batch(seed, batch=5, seq_len=6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, seq_len + 1, (batch,), generator=g)
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    lp = -3 * torch.rand(batch, seq_len, generator=g, dtype=F64)
    old = lp + 0.7 * torch.randn(batch, seq_len, generator=g, dtype=F64)
    old[0, 0] = lp[0, 0] - 1.6  # ρ ≈ 5 so the dual clip acts
    ref = lp + torch.randn(batch, seq_len, generator=g, dtype=F64)
    ref[1, 0] = lp[1, 0] + 3.0  # k3 ≈ 16 > clamp 10
    adv = torch.randn(batch, generator=g, dtype=F64)
    adv[0] = -abs(adv[0])
    return lp, old, adv, mask, ref


CONFIGS = [
    PolicyLossConfig(),
    PolicyLossConfig(aggregation="sequence_mean"),
    PolicyLossConfig(dual_clip=3.0, kl_coef=0.05, kl_clamp=10.0),
    PolicyLossConfig(clip_low=0.1, clip_high=0.4, kl_coef=0.05, kl_bias_correction=True, aggregation="sequence_mean"),
    PolicyLossConfig(dual_clip=3.0, kl_coef=0.05, kl_clamp=10.0, kl_bias_correction=True),
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_loss_and_gradient_match_loop_reference(config):
    lp, old, adv, mask, ref = _random_batch(seed=3)
    ours_lp, ref_lp = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
    loss, _ = policy_loss(ours_lp, old, adv, mask, config, ref)
    expected = _loop_reference_loss(ref_lp, old, adv, mask, config, ref)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(loss, ours_lp)
    (expected_grad,) = torch.autograd.grad(expected, ref_lp)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: policy_loss(x, old, adv, mask, config, ref)[0], (ours_lp,))


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_micro_batches_sum_to_mini_batch(config):
    # Unequal micro-batch sizes and lengths: only the shared loss_normalizer makes the sum exact.
    lp, old, adv, mask, ref = _random_batch(seed=4, batch=7)
    full_lp = lp.clone().requires_grad_(True)
    full, _ = policy_loss(full_lp, old, adv, mask, config, ref)
    (full_grad,) = torch.autograd.grad(full, full_lp)
    normalizer = loss_normalizer_for(mask, config.aggregation)
    micro_lp = lp.clone().requires_grad_(True)
    total = sum(
        policy_loss(micro_lp[s], old[s], adv[s], mask[s], config, ref[s], loss_normalizer=normalizer)[0]
        for s in (slice(0, 2), slice(2, 3), slice(3, 7))
    )
    (micro_grad,) = torch.autograd.grad(total, micro_lp)
    torch.testing.assert_close(total, full, rtol=0, atol=1e-6)
    torch.testing.assert_close(micro_grad, full_grad, rtol=0, atol=1e-6)


def test_loss_normalizer_for_and_validation():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    assert loss_normalizer_for(mask, "token_mean") == 5.0
    assert loss_normalizer_for(mask, "sequence_mean") == 2.0  # the empty row is not a sequence
    assert loss_normalizer_for(torch.zeros(2, 3), "token_mean") == 1.0  # empty batch: loss 0, not NaN
    lp = torch.zeros(1, 2)
    with pytest.raises(ValueError):
        policy_loss(lp, lp, torch.ones(1), torch.ones(1, 2), PolicyLossConfig(kl_coef=0.1))
    for bad in (dict(aggregation="sum"), dict(dual_clip=1.0), dict(kl_clamp=0.0), dict(clip_low=1.0)):
        with pytest.raises(ValueError):
            PolicyLossConfig(**bad)


def test_padding_with_infinite_log_probs_leaves_loss_and_gradient_finite():
    # A masked position may hold anything (-inf in old log-probs, a prompt token far below float32's
    # exp range): it must change neither the loss nor the gradient of the completion tokens.
    old = torch.tensor([[-1.2, -math.inf]], dtype=F64)
    for advantage, expected in ((-1.0, math.exp(0.2)), (1.0, -math.exp(0.2))):
        logprobs = torch.tensor([[-1.0, 0.0]], dtype=F64, requires_grad=True)
        loss, _ = policy_loss(logprobs, old, torch.tensor([advantage], dtype=F64), torch.tensor([[1, 0]]),
                              PolicyLossConfig())
        (grad,) = torch.autograd.grad(loss, logprobs)
        assert float(loss) == pytest.approx(expected, rel=1e-12)
        assert grad[0].tolist() == pytest.approx([expected, 0.0], rel=1e-12)   # dL/dlog π = −ρA
    # k3 on float32 with a prompt position at log-prob -100 (the learner zeroes ref there): q = 100 there.
    ref = torch.tensor([[0.0, -1.2]])
    for kl_clamp in (None, 10.0):
        logprobs = torch.tensor([[-100.0, -1.0]], requires_grad=True)
        loss, _ = policy_loss(logprobs, logprobs.detach(), torch.zeros(1), torch.tensor([[0, 1]]),
                              PolicyLossConfig(kl_coef=1e-3, kl_clamp=kl_clamp), ref_logprobs=ref)
        (grad,) = torch.autograd.grad(loss, logprobs)
        q = -0.2
        assert float(loss) == pytest.approx(1e-3 * (math.exp(q) - q - 1), rel=1e-5)
        assert torch.isfinite(grad).all() and grad[0, 0] == 0
        assert float(grad[0, 1]) == pytest.approx(1e-3 * (1 - math.exp(q)), rel=1e-5)   # d k3 / d log π = 1 − e^q


def test_far_off_policy_token_cannot_overflow_the_ratio():
    # log ρ = 100 overflows exp in float32; with A > 0 the high clip holds the loss at (1 + ε_high)·A
    # with zero gradient, and with A = 0 the loss is 0.
    for advantage, expected in ((1.0, -1.28), (0.0, 0.0)):
        logprobs = torch.tensor([[100.0]], requires_grad=True)
        loss, _ = policy_loss(logprobs, torch.zeros(1, 1), torch.tensor([advantage]), torch.ones(1, 1),
                              PolicyLossConfig())
        (grad,) = torch.autograd.grad(loss, logprobs)
        assert float(loss) == pytest.approx(expected, abs=1e-6) and float(grad) == 0.0


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_token_log_probs_matches_log_softmax_float64(temperature):
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(3, 5, 11, generator=g, dtype=F64)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    ours_in, ref_in = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ours = token_log_probs(ours_in, labels, temperature, out_dtype=F64)
    expected = torch.log_softmax(ref_in / temperature, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    upstream = torch.randn(3, 5, generator=g, dtype=F64)
    (grad,) = torch.autograd.grad(ours, ours_in, upstream)
    (expected_grad,) = torch.autograd.grad(expected, ref_in, upstream)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)
    assert torch.equal(ours_in.detach(), logits)  # the row-wise in-place work used copies
    default = token_log_probs(logits, labels, temperature)
    assert default.dtype == torch.float32
    torch.testing.assert_close(default, expected.float().detach(), rtol=0, atol=1e-5)


def test_token_log_probs_low_precision_padding_and_views():
    g = torch.Generator().manual_seed(1)
    full = torch.randn(2, 6, 9, generator=g).to(torch.bfloat16)
    logits = full[:, :-1].clone().requires_grad_(True)  # the usual shift, as a leaf
    labels = torch.randint(0, 9, (2, 5), generator=g)
    labels[1, 3:] = -100  # padding ids
    ours = token_log_probs(logits, labels, 0.8)
    expected = torch.log_softmax(logits.detach().float() / 0.8, dim=-1).gather(-1, labels.clamp(min=0)[..., None])
    expected = expected.squeeze(-1).masked_fill(labels < 0, 0.0)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    ours.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    assert torch.equal(logits.grad[1, 3:].float(), torch.zeros(2, 9))  # padding gets no gradient
    assert torch.autograd.gradcheck(
        lambda x: token_log_probs(x, labels, 0.8, out_dtype=F64), (torch.randn(2, 5, 9, dtype=F64, requires_grad=True),)
    )
    view = full.float()[:, :-1]  # non-contiguous input, float32; must not be modified in place
    before = view.clone()
    torch.testing.assert_close(token_log_probs(view, labels, 0.8), expected, rtol=0, atol=1e-5)
    assert torch.equal(view, before)
