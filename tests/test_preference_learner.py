"""The DPO / BVPO learner in-process (DeepSpeed world of one, the built-in model; no Ray):
summed completion log-probs, the cached frozen reference, micro-batch accumulation, DPO = trace only,
NaN steps skipped without touching the weights, and α̂ on the output head (ALGORITHMS.md §DPO, §BVPO)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from rl_service.algorithms.preference import dpo_loss  # noqa: E402
from rl_service.config import load_config  # noqa: E402
from rl_service.data.preferences import TokenizedPair, load_preference_file, tokenize_row  # noqa: E402
from rl_service.training.preference_learner import PreferenceLearner, sequence_logps  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "configs" / "data" / "bvpo_offline.jsonl"
ROWS = load_preference_file(DATA).rows[:6]


def _learner(*overrides: str, name: str = "bvpo", mode: str = "offline") -> PreferenceLearner:
    config = load_config(None, [f"algorithm.name={name}", f"preference.mode={mode}", f"preference.dataset_path={DATA}",
                                "learner.zero_stage=0", "learner.lr=1e-3", "learner.micro_batch_size=64", *overrides])
    return PreferenceLearner(config)


def _pairs(learner: PreferenceLearner, rows=ROWS) -> list[TokenizedPair]:
    return [tokenize_row(learner.tokenizer, row, learner.with_empty) for row in rows]


def _parameters(learner: PreferenceLearner) -> list[torch.Tensor]:
    return [p.detach().clone() for p in learner.engine.module.parameters()]


def _gradients_of_one_step(learner: PreferenceLearner, pairs) -> tuple[list[torch.Tensor], dict]:
    learner.engine.step = lambda: None  # keep the accumulated gradients to look at them
    metrics = learner.train_step(pairs)
    return [p.grad.detach().clone() for p in learner.engine.module.parameters()], metrics


@pytest.fixture(scope="module")
def learner() -> PreferenceLearner:
    return _learner()


def test_sequence_logps_sum_completion_tokens_only_and_ignore_padding(learner):
    pair = _pairs(learner)[0]
    prompts = [pair.trace_prompt, pair.empty_prompt]
    completions = [pair.trace_chosen, pair.empty_chosen]
    with torch.no_grad():
        batched = sequence_logps(learner.reference_model, prompts, completions, learner.pad_token_id)
        for row, (prompt, completion) in enumerate(zip(prompts, completions)):
            ids = torch.tensor([prompt + completion])
            logp = torch.log_softmax(learner.reference_model(input_ids=ids).logits[0].double(), -1)
            manual = sum(float(logp[len(prompt) - 1 + t, token]) for t, token in enumerate(completion))
            assert float(batched[row]) == pytest.approx(manual, abs=1e-4)


def test_reference_logps_are_computed_once_per_pair_and_stay_frozen():
    learner = _learner()
    pairs = _pairs(learner)
    first = learner.reference_logps(pairs)
    assert first.shape == (6, 4) and torch.isfinite(first).all()
    assert learner.counters["reference_pairs_computed"] == 6 and learner.counters["reference_cache_hits"] == 0
    for _ in range(2):
        learner.train_step(pairs)
    assert learner.counters["reference_pairs_computed"] == 6 and learner.counters["reference_cache_hits"] == 12
    # A copy of pair 0 under a new id is recomputed: the reference model did not move with training...
    copy = TokenizedPair(10_000, *[getattr(pairs[0], name) for name in
                                   ("trace_prompt", "trace_chosen", "trace_rejected", "empty_prompt", "empty_chosen",
                                    "empty_rejected")])
    assert torch.allclose(learner.reference_logps([copy])[0], first[0], atol=1e-5)
    # ...while the policy did.
    with torch.no_grad():
        policy = sequence_logps(learner.engine.module, [copy.trace_prompt], [copy.trace_chosen], learner.pad_token_id)
    assert abs(float(policy[0]) - float(first[0, 0])) > 1e-3


def test_first_step_loss_is_log_two_with_both_terms(learner):
    fresh = _learner()
    metrics = fresh.train_step(_pairs(fresh))
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-5)           # π_θ = π_ref at the start
    assert metrics["trace_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["empty_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["alpha"] == 0.5 and metrics["optimizer_steps"] == 1 and metrics["skipped_step"] == 0
    assert metrics["grad_norm"] > 0 and metrics["pairs"] == 6
    assert fresh.train_step(_pairs(fresh))["loss"] < math.log(2)              # it learns the preference


def test_micro_batches_accumulate_exactly_the_batch_gradient():
    whole, _ = _gradients_of_one_step(_learner("learner.micro_batch_size=64"), _pairs(_learner()))
    split_learner = _learner("learner.micro_batch_size=4")                   # one pair per micro-batch
    split, _ = _gradients_of_one_step(split_learner, _pairs(split_learner))
    for a, b in zip(whole, split):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_dpo_is_bvpo_with_alpha_one_on_the_trace_pairs_alone():
    dpo = _learner(name="dpo")
    pairs = _pairs(dpo)
    assert pairs[0].empty_prompt is None
    dpo_grads, metrics = _gradients_of_one_step(dpo, pairs)
    assert metrics["alpha"] == 1.0 and "empty_loss" not in metrics and metrics["trace_loss"] == pytest.approx(math.log(2), abs=1e-5)
    bvpo = _learner("preference.alpha=1.0")
    bvpo_grads, _ = _gradients_of_one_step(bvpo, _pairs(bvpo))
    for a, b in zip(dpo_grads, bvpo_grads):
        assert torch.allclose(a, b, atol=1e-7)


def _drop_mode(pair: TokenizedPair, mode: str) -> TokenizedPair:
    """The pair as a prompt with no pair in `mode` (what per_term pairing keeps)."""
    return TokenizedPair(pair.pair_id, **{name: getattr(pair, name) if not name.startswith(mode) else None
                                          for name in ("trace_prompt", "trace_chosen", "trace_rejected", "empty_prompt",
                                                       "empty_chosen", "empty_rejected")})


def test_per_term_learner_gradient_is_the_formula_with_one_mode_missing():
    """§BVPO.3 per_term through the learner (one pair per micro-batch): the accumulated gradient is
    that of α·mean(trace pairs) + (1 − α)·mean(empty pairs), built here from the model directly."""
    learner = _learner("preference.pairing=per_term", "preference.alpha=0.3", "learner.micro_batch_size=4")
    pairs = _pairs(learner)
    pairs[1], pairs[4] = _drop_mode(pairs[1], "trace"), _drop_mode(pairs[4], "empty")
    grads, metrics = _gradients_of_one_step(learner, pairs)
    assert metrics["trace_pairs"] == 5 and metrics["empty_pairs"] == 5 and metrics["pairs"] == 6
    assert metrics["alpha_effective"] == 0.3 and metrics["trace_only_step"] == 0 and metrics["empty_only_step"] == 0

    reference = _learner()
    model = reference.engine.module

    def mode_loss(prompts, chosen, rejected):
        with torch.no_grad():
            ref = sequence_logps(reference.reference_model, prompts * 2, chosen + rejected, reference.pad_token_id)
        policy = sequence_logps(model, prompts * 2, chosen + rejected, reference.pad_token_id)
        n = len(prompts)
        return dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], 0.1)[0]

    trace = [p for p in pairs if p.trace_chosen is not None]
    empty = [p for p in pairs if p.empty_chosen is not None]
    loss = (0.3 * mode_loss([p.trace_prompt for p in trace], [p.trace_chosen for p in trace], [p.trace_rejected for p in trace])
            + 0.7 * mode_loss([p.empty_prompt for p in empty], [p.empty_chosen for p in empty], [p.empty_rejected for p in empty]))
    want = torch.autograd.grad(loss, list(model.parameters()))
    for a, b in zip(grads, want):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert metrics["loss"] == pytest.approx(float(loss), abs=1e-6)


def test_per_term_step_with_one_term_only_says_so():
    learner = _learner("preference.pairing=per_term")
    metrics = learner.train_step([_drop_mode(pair, "empty") for pair in _pairs(learner)])
    assert metrics["alpha_effective"] == 1.0 and metrics["trace_only_step"] == 1 and metrics["empty_pairs"] == 0
    assert "empty_loss" not in metrics and metrics["loss"] == pytest.approx(metrics["trace_loss"])
    assert metrics["optimizer_steps"] == 1
    metrics = learner.train_step([_drop_mode(pair, "trace") for pair in _pairs(learner)])
    assert metrics["alpha_effective"] == 0.0 and metrics["empty_only_step"] == 1 and "trace_loss" not in metrics


def test_same_prompts_is_unchanged_and_equals_per_term_when_every_prompt_has_both_pairs():
    same = _learner("preference.pairing=same_prompts", "learner.micro_batch_size=8")
    same_grads, same_metrics = _gradients_of_one_step(same, _pairs(same))
    per_term = _learner("preference.pairing=per_term", "learner.micro_batch_size=8")
    per_term_grads, per_term_metrics = _gradients_of_one_step(per_term, _pairs(per_term))
    for a, b in zip(same_grads, per_term_grads):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)
    assert same_metrics["loss"] == pytest.approx(per_term_metrics["loss"], abs=1e-6)
    with pytest.raises(ValueError, match="same_prompts"):
        same.train_step([_drop_mode(pair, "empty") for pair in _pairs(same)])


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_nan_loss_skips_the_step_and_never_reaches_the_weights(zero_stage):
    learner = _learner(f"learner.zero_stage={zero_stage}", "learner.micro_batch_size=4")
    pairs = _pairs(learner)
    learner.reference_logps(pairs)
    clean = learner.reference_cache[pairs[3].pair_id].clone()
    learner.reference_cache[pairs[3].pair_id] = torch.full((4,), float("nan"))  # micro-batches 0–2 ran backward first
    before = _parameters(learner)
    metrics = learner.train_step(pairs)
    assert metrics["nan_skipped_step"] == 1 and metrics["skipped_step"] == 1 and metrics["nan_skipped_steps"] == 1
    assert metrics["optimizer_steps"] == 0
    for a, b in zip(before, _parameters(learner)):
        assert torch.equal(a, b)
    # No gradient is left over: the next step is exactly a fresh learner's first step.
    learner.reference_cache[pairs[3].pair_id] = clean
    after_retry = learner.train_step(pairs)
    fresh = _learner(f"learner.zero_stage={zero_stage}", "learner.micro_batch_size=4")
    fresh_metrics = fresh.train_step(_pairs(fresh))
    assert after_retry["optimizer_steps"] == 1 and after_retry["nan_skipped_steps"] == 1
    assert after_retry["grad_norm"] == pytest.approx(fresh_metrics["grad_norm"], rel=1e-5)
    for a, b in zip(_parameters(learner), _parameters(fresh)):
        assert torch.allclose(a, b, atol=1e-6)


def _with_resamples(learner: PreferenceLearner) -> list[TokenizedPair]:
    pairs = _pairs(learner)
    encode = lambda text: learner.tokenizer(text, add_special_tokens=False)["input_ids"] + [learner.tokenizer.eos_token_id]  # noqa: E731
    for pair, row in zip(pairs, ROWS):
        other_wrong = encode(row.trace_rejected.replace("</think>\n\n", "</think>\n\n1"))
        longer_right = encode(row.trace_chosen.replace("<think>\n", "<think>\nok, "))
        pair.trace_resamples = [(pair.trace_chosen, pair.trace_rejected), (pair.trace_chosen, other_wrong),
                                (longer_right, pair.trace_rejected)]
    return pairs


def test_online_alpha_is_estimated_logged_and_used():
    learner = _learner("preference.alpha_mode=online", "preference.alpha_min=0.1", "preference.alpha_max=0.9",
                       mode="online")
    metrics = learner.train_step(_with_resamples(learner))
    assert 0.1 <= metrics["bvpo_alpha"] <= 0.9 and metrics["alpha"] == metrics["bvpo_alpha"]
    assert metrics["bvpo_trace_variance"] > 0 and metrics["bvpo_bias_sq"] >= 0
    assert metrics["alpha_subset_size"] % learner.engine.module.config.hidden_size == 0
    assert learner.alpha_estimator.num_updates == 1 and set(learner.alpha_state()) >= {"ema_numerator"}


def _autograd_head_gradient(learner: PreferenceLearner, pairs_of_sequences, rows) -> torch.Tensor:
    """Mean DPO loss of the given ((prompt, chosen), (prompt, rejected)) pairs, differentiated through
    the whole model with the input embeddings frozen (only the head path reaches the matrix)."""
    from rl_service.training.preference_learner import padded_batch

    model = learner.engine.module
    sequences = [seq for pair in pairs_of_sequences for seq in pair]
    ids, mask, completion = padded_batch([s for s, _ in sequences], [c for _, c in sequences], learner.pad_token_id)
    embeds = model.get_input_embeddings()(ids).detach()
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1].float()
    logp = (torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) * completion).sum(-1)
    with torch.no_grad():
        ref = sequence_logps(learner.reference_model, [s for s, _ in sequences], [c for _, c in sequences],
                             learner.pad_token_id)
    loss, _ = dpo_loss(logp[0::2], logp[1::2], ref[0::2], ref[1::2], learner.beta)
    (grad,) = torch.autograd.grad(loss, model.get_output_embeddings().weight)
    return grad[rows].flatten()


def test_head_subset_gradient_matches_the_full_model_with_frozen_inputs():
    """The closed-form per-pair head gradients of α̂ equal autograd's, per prompt and per batch."""
    learner = _learner("preference.alpha_mode=online", mode="online")
    pairs = _with_resamples(learner)
    trace_grads, empty_grad = learner._head_subset_gradients(pairs)
    assert trace_grads.shape == (6, 3, empty_grad.numel()) and trace_grads.dtype == torch.float64
    rows = torch.unique(torch.cat([torch.tensor(c) for p in pairs
                                   for c in (p.empty_chosen, p.empty_rejected, *[x for pair in p.trace_resamples for x in pair])]))
    empty = _autograd_head_gradient(learner, [((p.empty_prompt, p.empty_chosen), (p.empty_prompt, p.empty_rejected))
                                              for p in pairs], rows)
    assert torch.allclose(empty_grad.float(), empty, atol=1e-6)
    for i, k in [(0, 0), (2, 1), (5, 2)]:   # one prompt's k-th resample alone
        chosen, rejected = pairs[i].trace_resamples[k]
        single = _autograd_head_gradient(learner, [((pairs[i].trace_prompt, chosen), (pairs[i].trace_prompt, rejected))], rows)
        assert torch.allclose(trace_grads[i, k].float(), single, atol=1e-6)
    # The batch's k-th resample (every prompt's k-th pair) is the mean of the per-prompt gradients.
    batch = _autograd_head_gradient(learner, [((p.trace_prompt, p.trace_resamples[1][0]), (p.trace_prompt, p.trace_resamples[1][1]))
                                              for p in pairs], rows)
    assert torch.allclose(trace_grads[:, 1].mean(0).float(), batch, atol=1e-6)


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_a_restored_learner_continues_bit_identically(tmp_path, mode):
    """save_checkpoint after 2 steps + a new learner from it + 2 steps == 4 uninterrupted steps, to the
    bit: weights, Adam moments, LR schedule, counters, the offline reference cache (rows come back
    after the checkpoint) and α̂'s moving averages (online, fresh pair ids every step)."""
    from dataclasses import replace

    overrides = ("preference.alpha_mode=online", "learner.zero_stage=1") if mode == "online" else ("learner.zero_stage=1",)

    def batches(learner):
        pairs = _with_resamples(learner) if mode == "online" else _pairs(learner)
        chosen = [pairs[:4], pairs[2:], pairs[:4], pairs[1:5]]
        if mode == "online":   # online pairs never come back: new ids every step
            chosen = [[replace(pair, pair_id=100 * step + k) for k, pair in enumerate(batch)] for step, batch in enumerate(chosen)]
        return chosen

    def comparable(metrics):
        return {key: value for key, value in metrics.items() if key != "train_seconds"}

    whole = _learner(*overrides, mode=mode)
    want = [comparable(whole.train_step(batch)) for batch in batches(whole)]

    first = _learner(*overrides, mode=mode)
    steps = batches(first)
    got = [comparable(first.train_step(batch)) for batch in steps[:2]]
    first.save_checkpoint(tmp_path)
    assert (tmp_path / "reference_cache.safetensors").is_file() == (mode == "offline")
    config = load_config(None, [f"algorithm.name=bvpo", f"preference.mode={mode}", f"preference.dataset_path={DATA}",
                                "learner.lr=1e-3", "learner.micro_batch_size=64", *overrides])
    resumed = PreferenceLearner(config, resume_from=tmp_path)
    got += [comparable(resumed.train_step(batch)) for batch in steps[2:]]
    assert got == want
    if mode == "online":
        assert resumed.alpha_estimator.state_dict() == whole.alpha_estimator.state_dict()
    else:
        assert want[-1]["reference_cache_hits"] > 0
    for a, b in zip(_parameters(resumed), _parameters(whole)):
        assert torch.equal(a, b)


def test_a_lora_preference_learner_starts_at_log_two_and_keeps_the_base_as_its_reference():
    # π_ref under LoRA is the base with the adapters off: equal to the policy at step 1 (B = 0), so the
    # first loss is log 2 as with a second copy of the model, and the base never moves.
    from rl_service.models.loading import load_causal_lm

    fresh = _learner("learner.lora.rank=4", "preference.alpha_mode=online", mode="online")
    pairs = _with_resamples(fresh)
    first = fresh.train_step(pairs)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5) and first["bvpo_trace_variance"] > 0
    assert fresh.train_step(pairs)["loss"] < math.log(2)
    base = load_causal_lm("builtin", "float32")
    ids = torch.tensor([pairs[0].trace_prompt + pairs[0].trace_chosen])
    assert torch.equal(fresh.reference_model(input_ids=ids).logits, base(input_ids=ids).logits)
    assert sequence_logps(fresh.reference_model, [pairs[0].trace_prompt], [pairs[0].trace_chosen],
                          fresh.pad_token_id) == pytest.approx(float(fresh.reference_logps(pairs[:1])[0, 0]))
