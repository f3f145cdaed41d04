"""The learner of DPO / BVPO jobs: a DeepSpeed engine applying ALGORITHMS.md §DPO / §BVPO.3 updates.

Per step, for a batch of :class:`~rl_service.data.preferences.TokenizedPair` (one prompt each, both
modes for BVPO, trace only for DPO):

1. reference log-probs ``log π_ref`` of every completion, summed over completion tokens, from a
   frozen copy of the initial model, computed once per pair id and cached (§DPO);
2. with ``alpha_mode: online``, α̂ (§BVPO.6): gradients of K resampled trace losses and of the
   empty-trace loss on a cheap parameter subset — the output head's rows of the tokens the step's
   completions use — feed :class:`~rl_service.algorithms.preference.OnlineAlphaEstimator`;
3. ``L = α L_t + (1 − α) L_e`` (:func:`bvpo_loss`; DPO is α = 1 on the trace pairs alone) over
   micro-batches of pairs, each weighted by its share of the batch, so the accumulated gradient is
   the whole batch's; one optimizer step.

A non-finite loss (or, at ZeRO 0, gradient) skips the step: the gradients are discarded, the
weights are not touched, and the skip is counted. No Ray here: `actors/preference_learner.py` wraps it.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict

import torch

from rl_service.algorithms.logprobs import token_log_probs
from rl_service.algorithms.preference import OnlineAlphaEstimator, PreferenceLogps, bvpo_loss, dpo_loss
from rl_service.config import JobConfig
from rl_service.data.preferences import TokenizedPair
from rl_service.models.loading import load_causal_lm
from rl_service.training.engine import EngineWeights, build_engine

# Column order of a pair's four sequences in every [B, 4] log-prob table.
TRACE_CHOSEN, TRACE_REJECTED, EMPTY_CHOSEN, EMPTY_REJECTED = range(4)


def padded_batch(prompts: list[list[int]], completions: list[list[int]], pad_token_id: int):
    """Right-padded ``input_ids``/``attention_mask`` [N, L] and ``completion_mask`` [N, L−1] marking
    the completion's labels (label t predicts input t+1), the layout of `training/batch.py`."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    completion_mask = torch.zeros((len(prompts), width - 1), dtype=torch.float32)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        length = len(prompt) + len(completion)
        input_ids[row, :length] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[row, :length] = 1
        completion_mask[row, len(prompt) - 1:length - 1] = 1.0
    return input_ids, attention_mask, completion_mask


def sequence_logps(model, prompts: list[list[int]], completions: list[list[int]], pad_token_id: int) -> torch.Tensor:
    """[N] Σ_t log π(y_t | x, y_<t) over completion tokens only (ALGORITHMS.md Notation), at τ = 1."""
    input_ids, attention_mask, completion_mask = padded_batch(prompts, completions, pad_token_id)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    return (token_log_probs(logits, input_ids[:, 1:]) * completion_mask).sum(-1)


def _pair_sequences(pair: TokenizedPair, with_empty: bool) -> list[tuple[list[int], list[int]]]:
    sequences = [(pair.trace_prompt, pair.trace_chosen), (pair.trace_prompt, pair.trace_rejected)]
    if with_empty:
        sequences += [(pair.empty_prompt, pair.empty_chosen), (pair.empty_prompt, pair.empty_rejected)]
    return sequences


class PreferenceLearner(EngineWeights):
    def __init__(self, config: JobConfig):
        self.config = config
        model_config = config.model
        self.tokenizer, self.engine = build_engine(config)
        self.pad_token_id = self.tokenizer.pad_token_id
        # π_ref is the initial policy, frozen (§DPO); on the learner: the models here are small.
        self.reference_model = load_causal_lm(model_config.path, model_config.dtype,
                                              model_config.trust_remote_code).eval().requires_grad_(False)
        preference = config.preference
        self.with_empty = config.algorithm.name == "bvpo"   # dpo: trace-only, i.e. BVPO with α = 1
        self.beta = preference.beta
        self.fixed_alpha = preference.alpha if self.with_empty else 1.0
        self.alpha_estimator = (OnlineAlphaEstimator(preference.alpha_ema, preference.alpha_min, preference.alpha_max)
                                if preference.alpha_mode == "online" and self.with_empty else None)
        self.reference_cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.cache_size = preference.reference_cache_size
        self.counters = {"nan_skipped_steps": 0, "optimizer_steps": 0, "reference_cache_hits": 0,
                         "reference_pairs_computed": 0}

    # -- reference log-probs, once per pair (§DPO) -----------------------------------------------
    @torch.no_grad()
    def reference_logps(self, pairs: list[TokenizedPair]) -> torch.Tensor:
        """[B, 4] cached log π_ref of (trace chosen, trace rejected, empty chosen, empty rejected); the
        empty columns are NaN for trace-only DPO."""
        missing = [pair for pair in pairs if pair.pair_id not in self.reference_cache]
        self.counters["reference_cache_hits"] += len(pairs) - len(missing)
        per_micro = max(1, self.config.learner.micro_batch_size // (4 if self.with_empty else 2))
        for start in range(0, len(missing), per_micro):
            micro = missing[start:start + per_micro]
            sequences = [seq for pair in micro for seq in _pair_sequences(pair, self.with_empty)]
            logps = sequence_logps(self.reference_model, [p for p, _ in sequences], [c for _, c in sequences],
                                   self.pad_token_id).view(len(micro), -1)
            for pair, row in zip(micro, logps):
                self.reference_cache[pair.pair_id] = torch.nn.functional.pad(row, (0, 4 - row.numel()), value=math.nan)
            self.counters["reference_pairs_computed"] += len(micro)
        rows = []
        for pair in pairs:
            self.reference_cache.move_to_end(pair.pair_id)
            rows.append(self.reference_cache[pair.pair_id])
        while len(self.reference_cache) > self.cache_size:  # LRU: online pairs never come back
            self.reference_cache.popitem(last=False)
        return torch.stack(rows)

    # -- α̂ on a cheap parameter subset (§BVPO.6) ------------------------------------------------
    def _head_subset_gradients(self, pairs: list[TokenizedPair]) -> tuple[torch.Tensor, torch.Tensor]:
        """([K, P] trace-loss gradients, one per resample, [P] empty-loss gradient) on the output
        head's rows of the tokens used by the step's completions. The body runs without a graph, so
        each gradient costs only the head's backward."""
        module = self.engine.module
        head = module.get_output_embeddings()
        index: dict[tuple, int] = {}
        sequences: list[tuple[list[int], list[int]]] = []

        def slot(prompt, completion) -> int:
            key = (tuple(prompt), tuple(completion))
            if key not in index:
                index[key] = len(sequences)
                sequences.append((prompt, completion))
            return index[key]

        num_resamples = min(len(pair.trace_resamples) for pair in pairs)
        trace_slots = [[(slot(pair.trace_prompt, c), slot(pair.trace_prompt, r)) for c, r in pair.trace_resamples[:num_resamples]]
                       for pair in pairs]
        empty_slots = [(slot(pair.empty_prompt, pair.empty_chosen), slot(pair.empty_prompt, pair.empty_rejected))
                       for pair in pairs]
        prompts, completions = [p for p, _ in sequences], [c for _, c in sequences]
        input_ids, attention_mask, completion_mask = padded_batch(prompts, completions, self.pad_token_id)
        with torch.no_grad():
            reference = sequence_logps(self.reference_model, prompts, completions, self.pad_token_id)
            hidden = module.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        with torch.enable_grad():
            logits = head(hidden[:, :-1])
            policy = (token_log_probs(logits, input_ids[:, 1:]) * completion_mask).sum(-1)
        rows = torch.unique(torch.cat([torch.tensor(c, dtype=torch.long) for c in completions]))

        def gradient(chosen_rejected: list[tuple[int, int]]) -> torch.Tensor:
            chosen = torch.tensor([c for c, _ in chosen_rejected])
            rejected = torch.tensor([r for _, r in chosen_rejected])
            loss, _ = dpo_loss(policy[chosen], policy[rejected], reference[chosen], reference[rejected], self.beta)
            (grad,) = torch.autograd.grad(loss, head.weight, retain_graph=True)
            return grad[rows].flatten().double()

        trace_grads = torch.stack([gradient([slots[k] for slots in trace_slots]) for k in range(num_resamples)])
        return trace_grads, gradient(empty_slots)

    def _update_alpha(self, pairs: list[TokenizedPair]) -> dict[str, float]:
        if min(len(pair.trace_resamples) for pair in pairs) < 2 or self.alpha_estimator is None:
            return {}
        trace_grads, empty_grad = self._head_subset_gradients(pairs)
        if not (torch.isfinite(trace_grads).all() and torch.isfinite(empty_grad).all()):
            return {"alpha_update_skipped": 1.0}  # a NaN gradient must not poison the EMAs
        self.alpha_estimator.update(trace_grads, empty_grad)
        return {**self.alpha_estimator.metrics(), "alpha_subset_size": float(empty_grad.numel())}

    # -- one step ---------------------------------------------------------------------------
    def _micro_loss(self, pairs: list[TokenizedPair], reference: torch.Tensor, alpha: float):
        sequences = [seq for pair in pairs for seq in _pair_sequences(pair, self.with_empty)]
        policy = sequence_logps(self.engine, [p for p, _ in sequences], [c for _, c in sequences],
                                self.pad_token_id).view(len(pairs), -1)
        trace = PreferenceLogps(policy[:, TRACE_CHOSEN], policy[:, TRACE_REJECTED],
                                reference[:, TRACE_CHOSEN], reference[:, TRACE_REJECTED])
        if not self.with_empty:
            loss, metrics = dpo_loss(trace.policy_chosen_logps, trace.policy_rejected_logps, trace.ref_chosen_logps,
                                     trace.ref_rejected_logps, beta=self.beta)
            return loss, {**{f"trace_{k}": v for k, v in metrics.items()}, "alpha": 1.0, "loss": metrics["loss"]}
        empty = PreferenceLogps(policy[:, EMPTY_CHOSEN], policy[:, EMPTY_REJECTED],
                                reference[:, EMPTY_CHOSEN], reference[:, EMPTY_REJECTED])
        return bvpo_loss(trace, empty, alpha, self.beta)

    def train_step(self, pairs: list[TokenizedPair]) -> dict[str, float]:
        started = time.perf_counter()
        metrics: dict[str, float] = {"pairs": float(len(pairs)), "skipped_step": 0.0}
        if not pairs:
            metrics["skipped_step"] = 1.0
            return {**metrics, **self._counter_metrics(), "train_seconds": time.perf_counter() - started}
        reference = self.reference_logps(pairs)
        self.engine.train()
        metrics.update(self._update_alpha(pairs))
        alpha = self.alpha_estimator.alpha if self.alpha_estimator is not None else self.fixed_alpha
        per_micro = max(1, self.config.learner.micro_batch_size // (4 if self.with_empty else 2))
        totals: dict[str, float] = {}
        finite = True
        for start in range(0, len(pairs), per_micro):
            micro = pairs[start:start + per_micro]
            loss, loss_metrics = self._micro_loss(micro, reference[start:start + per_micro], alpha)
            if not torch.isfinite(loss):
                finite = False  # never backpropagate a NaN: it would reach the weights at step()
                break
            share = len(micro) / len(pairs)  # dpo_loss is a batch mean: weight it by the micro's share
            self.engine.backward(loss * share, scale_wrt_gas=False)
            for key, value in loss_metrics.items():
                totals[key] = totals.get(key, 0.0) + value * share
        grad_norm = self._own_grad_norm() if finite else None
        if not finite or (grad_norm is not None and not math.isfinite(grad_norm)):
            self._discard_gradients()
            self.counters["nan_skipped_steps"] += 1
            metrics.update(skipped_step=1.0, nan_skipped_step=1.0, alpha=alpha)
            return {**metrics, **self._counter_metrics(), "train_seconds": time.perf_counter() - started}
        self.engine.step()
        if getattr(self.engine.optimizer, "overflow", False):  # ZeRO 1–2 found a non-finite gradient itself
            self.counters["nan_skipped_steps"] += 1
            metrics.update(skipped_step=1.0, nan_skipped_step=1.0)
        else:
            self.counters["optimizer_steps"] += 1
        if grad_norm is None:
            reported = self.engine.get_global_grad_norm()
            grad_norm = float(reported) if reported is not None else math.nan
        metrics.update(totals)
        metrics.update(grad_norm=grad_norm, learning_rate=float(self.engine.get_lr()[0]))
        return {**metrics, **self._counter_metrics(), "train_seconds": time.perf_counter() - started}

    def _own_grad_norm(self) -> float | None:
        """Pre-clip global gradient norm at ZeRO 0 (where DeepSpeed reports none); None at ZeRO 1–2,
        whose optimizer holds the reduced gradients and reports the norm after step()."""
        if self.config.learner.zero_stage != 0:
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def _discard_gradients(self) -> None:
        """Drop every accumulated gradient so the next step starts clean (ZeRO 0–2)."""
        optimizer = self.engine.optimizer
        if hasattr(optimizer, "zero_grad"):
            optimizer.zero_grad(set_to_none=True)
        for key in list(getattr(optimizer, "averaged_gradients", {}) or {}):
            optimizer.averaged_gradients[key] = None
        self.engine.zero_grad()

    def _counter_metrics(self) -> dict[str, float]:
        return {key: float(value) for key, value in self.counters.items()}

    # -- state ---------------------------------------------------------------------------------
    def alpha_state(self) -> dict[str, float]:
        return self.alpha_estimator.state_dict() if self.alpha_estimator is not None else {}
