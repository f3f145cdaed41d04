"""ALGORITHMS.md §DPO and §BVPO.3–6: DPO against TRL 1.16's own loss code, the BVPO mixed loss, the
closed-form α* against a brute-force minimum, the §BVPO.4 variance identity and the online α̂.

TRL parity: TRL 1.16 has no standalone DPO loss function; the sigmoid loss lives inside
`DPOTrainer._compute_loss`. We run that method on a bare instance (`object.__new__`) carrying only
the attributes it reads (derived from a real `DPOConfig` as `DPOTrainer.__init__` does, trl 1.16
dpo_trainer.py l.801–974). The one stand-in is the model: it returns our fixed log-probs as
one-token "sequences" (plus zero entropies/logits that feed only TRL's metrics), so the loss formula
that runs is TRL's.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rl_service.algorithms.preference import (
    OnlineAlphaEstimator,
    PreferenceLogps,
    bvpo_loss,
    dpo_loss,
    optimal_alpha,
    optimal_alpha_from_moments,
)

F64 = torch.float64


# ----------------------------------------------------------------------------------------------- §DPO
class _SingleProcessAccelerator:
    """accelerate.Accelerator stand-in for one process: gather is the identity."""

    device = torch.device("cpu")

    def gather(self, tensor):
        return tensor

    def gather_for_metrics(self, tensor):
        return tensor


class _FixedLogpsModel(torch.nn.Module):
    """Returns the given per-sequence log-probs as a single completion token per row (TRL sums them)."""

    def __init__(self, logps: torch.Tensor):
        super().__init__()
        self.logps = logps

    def forward(self, **kwargs):
        rows = self.logps.shape[0]
        zeros = torch.zeros(rows, 1, dtype=self.logps.dtype)
        return SimpleNamespace(log_probs=self.logps.unsqueeze(1), entropy=zeros, mean_logits=zeros,
                               is_top1=torch.zeros(rows, 1, dtype=torch.bool))


def _trl_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation warnings about unrelated fields
        args = DPOConfig(output_dir=tempfile.gettempdir(), use_cpu=True, bf16=False, report_to=[], beta=beta,
                         loss_type=["sigmoid"], precompute_ref_log_probs=True)
    trainer = object.__new__(DPOTrainer)
    trainer.args = args
    trainer.beta = args.beta
    trainer.precompute_ref_logps = args.precompute_ref_log_probs  # reference log-probs come from inputs
    trainer.loss_types = args.loss_type
    trainer.loss_weights = args.loss_weights or [1.0] * len(args.loss_type)
    trainer.ld_alpha = args.ld_alpha
    trainer.f_divergence_type = args.f_divergence_type
    trainer.f_alpha_divergence_coef = args.f_alpha_divergence_coef
    trainer.label_smoothing = args.label_smoothing
    trainer.use_weighting = args.use_weighting
    trainer.aux_loss_enabled = False
    trainer.accelerator = _SingleProcessAccelerator()
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    model = _FixedLogpsModel(torch.cat([policy_chosen, policy_rejected]))  # TRL's batch is [chosen, rejected]
    trainer.model = model
    rows = 2 * policy_chosen.shape[0]
    inputs = {"input_ids": torch.zeros(rows, 2, dtype=torch.long),
              "attention_mask": torch.ones(rows, 2, dtype=torch.long),
              "completion_mask": torch.ones(rows, 2, dtype=torch.long),  # shifted: one completion token per row
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("seed,beta", [(0, 0.1), (1, 0.5), (2, 0.02)])
def test_dpo_equals_trl_sigmoid_loss(seed, beta):
    g = torch.Generator().manual_seed(seed)
    batch = 7
    policy = (-20 * torch.rand(2, batch, generator=g, dtype=F64)).requires_grad_(True)
    ref = policy.detach() + 3 * torch.randn(2, batch, generator=g, dtype=F64)

    ours, metrics = dpo_loss(policy[0], policy[1], ref[0], ref[1], beta)
    (our_grad,) = torch.autograd.grad(ours, policy)
    theirs, trl_metrics = _trl_dpo_loss(policy[0], policy[1], ref[0], ref[1], beta)
    (their_grad,) = torch.autograd.grad(theirs, policy)

    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(our_grad, their_grad, rtol=0, atol=1e-6)
    for ours_key, trl_key in [("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                              ("rewards_margin", "rewards/margins"), ("rewards_accuracy", "rewards/accuracies"),
                              ("logps_chosen", "logps/chosen"), ("logps_rejected", "logps/rejected")]:
        assert metrics[ours_key] == pytest.approx(trl_metrics[trl_key], abs=1e-9), ours_key


def test_dpo_hand_computed_two_pairs():
    """β = 0.1; pair 1: log-ratios (+0.5, −0.5) → h = 0.1; pair 2: (−1, +1) → h = −0.2."""
    policy_chosen = torch.tensor([-1.0, -3.0], dtype=F64)
    policy_rejected = torch.tensor([-2.0, -1.0], dtype=F64)
    ref = torch.tensor([-1.5, -2.0], dtype=F64)
    loss, metrics = dpo_loss(policy_chosen, policy_rejected, ref, ref, beta=0.1)
    expected = (math.log1p(math.exp(-0.1)) + math.log1p(math.exp(0.2))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-15)
    assert metrics["rewards_chosen"] == pytest.approx(0.1 * (0.5 - 1.0) / 2, abs=1e-15)
    assert metrics["rewards_rejected"] == pytest.approx(0.1 * (-0.5 + 1.0) / 2, abs=1e-15)
    assert metrics["rewards_margin"] == pytest.approx((0.1 - 0.2) / 2, abs=1e-15)
    assert metrics["rewards_accuracy"] == 0.5
    # softplus(−h) stays finite where −log(sigmoid(h)) in float32 would give inf.
    big = torch.tensor([-2000.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0])
    assert dpo_loss(*big, beta=0.1)[0].item() == pytest.approx(200.0)


def test_dpo_rejects_bad_input():
    x = torch.zeros(3)
    with pytest.raises(ValueError):
        dpo_loss(x, torch.zeros(2), x, x)
    with pytest.raises(ValueError):
        dpo_loss(x, x, x, x, beta=0.0)


# ------------------------------------------------------------------------------------------ §BVPO.3–4
def _linear_mode_logps(theta, features, ref_shift):
    """Log-probs linear in θ (features [4, B, P]: policy chosen/rejected, the ref ones use θ = 0 + shift)."""
    chosen, rejected = features[0] @ theta, features[1] @ theta
    return PreferenceLogps(chosen, rejected, ref_shift[0], ref_shift[1])


def _dpo_of(mode: PreferenceLogps, beta: float = 0.1):
    return dpo_loss(mode.policy_chosen_logps, mode.policy_rejected_logps, mode.ref_chosen_logps,
                    mode.ref_rejected_logps, beta)[0]


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_bvpo_loss_and_gradient_are_the_alpha_mixture(alpha):
    g = torch.Generator().manual_seed(3)
    params = 9
    theta = torch.randn(params, generator=g, dtype=F64).requires_grad_(True)
    trace_features = torch.randn(2, 5, params, generator=g, dtype=F64)
    empty_features = torch.randn(2, 3, params, generator=g, dtype=F64)
    trace_ref, empty_ref = torch.randn(2, 5, generator=g, dtype=F64), torch.randn(2, 3, generator=g, dtype=F64)

    def modes():
        return (_linear_mode_logps(theta, trace_features, trace_ref),
                _linear_mode_logps(theta, empty_features, empty_ref))

    trace, empty = modes()
    loss, metrics = bvpo_loss(trace, empty, alpha, beta=0.3)
    (grad,) = torch.autograd.grad(loss, theta)
    trace, empty = modes()
    trace_loss, empty_loss = _dpo_of(trace, 0.3), _dpo_of(empty, 0.3)
    (trace_grad,) = torch.autograd.grad(trace_loss, theta)
    (empty_grad,) = torch.autograd.grad(empty_loss, theta)

    torch.testing.assert_close(loss, alpha * trace_loss + (1 - alpha) * empty_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, alpha * trace_grad + (1 - alpha) * empty_grad, rtol=0, atol=1e-12)
    assert metrics["alpha"] == alpha and metrics["trace_loss"] == pytest.approx(trace_loss.item())
    assert metrics["empty_loss"] == pytest.approx(empty_loss.item())


@pytest.mark.parametrize("alpha", [-0.1, 1.1, float("nan")])
def test_bvpo_rejects_alpha_outside_unit_interval(alpha):
    logps = PreferenceLogps(*torch.zeros(4, 2))
    with pytest.raises(ValueError):
        bvpo_loss(logps, logps, alpha)


def _trace_variance(samples):
    return float(samples.var(dim=0, unbiased=True).sum())


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.9])
def test_mixed_variance_over_trace_sampling_is_alpha_squared(alpha):
    """§BVPO.4: the empty-trace pairs are fixed, only the traces are resampled → Var(g_c) = α² Var(g_t)."""
    g = torch.Generator().manual_seed(4)
    params, resamples = 6, 300
    theta = torch.randn(params, generator=g, dtype=F64).requires_grad_(True)
    empty_features = torch.randn(2, 2, params, generator=g, dtype=F64)
    empty_ref = torch.randn(2, 2, generator=g, dtype=F64)
    mixed, trace_only = [], []
    for _ in range(resamples):
        trace_features = torch.randn(2, 2, params, generator=g, dtype=F64)
        trace_ref = torch.randn(2, 2, generator=g, dtype=F64)
        trace = _linear_mode_logps(theta, trace_features, trace_ref)
        empty = _linear_mode_logps(theta, empty_features, empty_ref)
        mixed.append(torch.autograd.grad(bvpo_loss(trace, empty, alpha)[0], theta)[0])
        trace = _linear_mode_logps(theta, trace_features, trace_ref)
        trace_only.append(torch.autograd.grad(_dpo_of(trace), theta)[0])
    ratio = _trace_variance(torch.stack(mixed)) / _trace_variance(torch.stack(trace_only))
    assert ratio == pytest.approx(alpha**2, rel=1e-9)


# ------------------------------------------------------------------------------------------- §BVPO.5
def _problem(kind, seed, resamples=64, params=6):
    g = torch.Generator().manual_seed(seed)
    g_true = torch.randn(params, generator=g, dtype=F64)
    z1, z2 = torch.randn(2, resamples, params, generator=g, dtype=F64)
    b_t, b_e = 0.3 * torch.randn(params, generator=g, dtype=F64), torch.randn(params, generator=g, dtype=F64)
    if kind == "correlated":  # both noisy, Σ_te ≠ 0, both biased
        return g_true + b_t + 1.5 * z1, g_true + b_e + 0.7 * z1 + 0.5 * z2, g_true
    if kind == "constant_empty":  # §BVPO setting: g_e has zero variance (identical rows)
        return g_true + b_t + 1.2 * z1, (g_true + b_e).expand(resamples, params).clone(), g_true
    if kind == "clip_low":  # g_t = g_e + more of the same noise: α_unc < 0
        return g_true + 2.0 * z1, g_true + z1, g_true
    if kind == "clip_high":  # α_unc > 1
        return g_true + z1, g_true + 2.0 * z1, g_true
    raise ValueError(kind)


def _empirical_mse(alpha, g_t, g_e, g_true):
    return float(((alpha * g_t + (1 - alpha) * g_e - g_true) ** 2).sum(1).mean())


def _golden_section_minimum(f, low=0.0, high=1.0, iterations=200):
    ratio = (math.sqrt(5) - 1) / 2
    a, b = low, high
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    for _ in range(iterations):
        if f(c) < f(d):
            b, d = d, c
            c = b - ratio * (b - a)
        else:
            a, c = c, d
            d = a + ratio * (b - a)
    return (a + b) / 2


@pytest.mark.parametrize("kind,seed", [("correlated", 0), ("correlated", 1), ("constant_empty", 2),
                                       ("constant_empty", 3), ("clip_low", 4), ("clip_high", 5)])
def test_optimal_alpha_is_the_brute_force_minimum(kind, seed):
    g_t, g_e, g_true = _problem(kind, seed)
    alpha_star = optimal_alpha(g_t, g_e, g_true)
    grid = torch.linspace(0, 1, 20001, dtype=F64)
    mse_grid = torch.tensor([_empirical_mse(a, g_t, g_e, g_true) for a in grid.tolist()], dtype=F64)
    grid_best = float(grid[int(mse_grid.argmin())])
    assert abs(alpha_star - grid_best) <= 1.0 / 20000 + 1e-12
    assert alpha_star == pytest.approx(_golden_section_minimum(lambda a: _empirical_mse(a, g_t, g_e, g_true)), abs=1e-7)
    mse_star = _empirical_mse(alpha_star, g_t, g_e, g_true)
    assert mse_star <= float(mse_grid.min()) + 1e-12
    assert mse_star <= min(_empirical_mse(0.0, g_t, g_e, g_true), _empirical_mse(1.0, g_t, g_e, g_true)) + 1e-12
    if kind == "clip_low":
        assert alpha_star == 0.0
    if kind == "clip_high":
        assert alpha_star == 1.0


def test_optimal_alpha_edge_cases_and_moments_form():
    g_t, g_e, g_true = _problem("constant_empty", 6)
    assert optimal_alpha(g_t, g_e[0], g_true) == optimal_alpha(g_t, g_e, g_true)  # [P] g_e is broadcast
    assert optimal_alpha(g_t, g_t.clone(), g_true) == 0.5  # identical estimators: denominator 0
    # §BVPO.6 special case: b_t = 0, Σ_e = Σ_te = 0 → α_unc = ‖b_e‖² / (tr Σ_t + ‖b_e‖²)
    b_e = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    assert optimal_alpha_from_moments(3.0, 0.0, 0.0, torch.zeros(3, dtype=F64), b_e) == pytest.approx(5.25 / 8.25)
    assert optimal_alpha_from_moments(0.0, 0.0, 0.0, torch.zeros(3), torch.zeros(3)) == 0.5
    with pytest.raises(ValueError):
        optimal_alpha(g_t, g_e[:, :2], g_true)


# ------------------------------------------------------------------------------------------- §BVPO.6
def _synthetic_stream(seed, params=8, bias_scale=1.0, noise_scale=1.0):
    """Unbiased g_t ~ N(g, Σ_t) with Σ_t = LLᵀ, g_e = g + b_e; returns (draw(K), g_e, α_unc)."""
    g = torch.Generator().manual_seed(seed)
    g_true = torch.randn(params, generator=g, dtype=F64)
    chol = noise_scale * torch.tril(torch.randn(params, params, generator=g, dtype=F64))
    b_e = bias_scale * torch.randn(params, generator=g, dtype=F64)
    tr_sigma_t = float((chol @ chol.T).trace())
    alpha_unc = optimal_alpha_from_moments(tr_sigma_t, 0.0, 0.0, torch.zeros(params, dtype=F64), b_e)

    def draw(resamples):
        return g_true + torch.randn(resamples, params, generator=g, dtype=F64) @ chol.T

    return draw, g_true + b_e, alpha_unc


@pytest.mark.parametrize("seed,bias_scale", [(0, 2.0), (1, 3.5), (2, 5.0)])
def test_online_alpha_converges_to_closed_form(seed, bias_scale):
    draw, g_e, alpha_unc = _synthetic_stream(seed, bias_scale=bias_scale)
    assert 0.1 < alpha_unc < 0.9  # a non-trivial target
    estimator = OnlineAlphaEstimator(ema_decay=0.995)
    for _ in range(3000):
        estimator.update(draw(4), g_e)
    assert estimator.alpha == pytest.approx(alpha_unc, abs=0.03)
    assert estimator.trace_variance > 0 and estimator.bias_sq >= 0
    assert set(estimator.metrics()) == {"bvpo_alpha", "bvpo_bias_sq", "bvpo_trace_variance"}


def test_online_alpha_clipping_zero_denominator_and_state():
    draw, g_e, alpha_unc = _synthetic_stream(0, bias_scale=5.0)
    assert alpha_unc > 0.6
    clipped = OnlineAlphaEstimator(ema_decay=0.9, alpha_min=0.1, alpha_max=0.4)
    assert clipped.alpha == 0.4  # 0.5 before any update, clipped
    for _ in range(50):
        clipped.update(draw(3), g_e)
    assert clipped.alpha == 0.4
    unbiased = OnlineAlphaEstimator(alpha_min=0.2)
    for _ in range(50):
        samples = draw(4)
        unbiased.update(samples, samples.mean(0))  # g_e = ḡ_t: bias estimate floors at 0 → α̂ = 0 → α_min
    assert unbiased.alpha == 0.2
    still = OnlineAlphaEstimator()
    assert still.update(torch.ones(4, 3), torch.ones(3)) == 0.5  # tr Σ̂_t = 0 and ‖b̂_e‖² = 0

    original = OnlineAlphaEstimator(ema_decay=0.8)
    for _ in range(5):
        original.update(draw(4), g_e)
    restored = OnlineAlphaEstimator(ema_decay=0.8)
    restored.load_state_dict(original.state_dict())
    assert all(isinstance(v, float) for v in original.state_dict().values())
    batch = draw(4)
    assert restored.update(batch, g_e) == original.update(batch, g_e)
    with pytest.raises(ValueError):
        restored.load_state_dict({"alpha": 0.3})


@pytest.mark.parametrize("kwargs", [dict(alpha_min=0.6, alpha_max=0.4), dict(alpha_max=1.2), dict(alpha_min=-0.1),
                                    dict(ema_decay=1.0), dict(ema_decay=-0.5)])
def test_online_alpha_rejects_bad_config(kwargs):
    with pytest.raises(ValueError):
        OnlineAlphaEstimator(**kwargs)


def test_online_alpha_rejects_bad_gradients():
    estimator = OnlineAlphaEstimator()
    with pytest.raises(ValueError):
        estimator.update(torch.zeros(1, 5), torch.zeros(5))  # K = 1
    with pytest.raises(ValueError):
        estimator.update(torch.zeros(3, 5), torch.zeros(4))
    with pytest.raises(ValueError):
        estimator.update(torch.zeros(5), torch.zeros(5))
    with pytest.raises(ValueError):
        estimator.update(torch.zeros(2, 1, 5), torch.zeros(5))  # K = 1 per prompt
    with pytest.raises(ValueError):
        estimator.update(torch.full((3, 5), float("nan")), torch.zeros(5))
