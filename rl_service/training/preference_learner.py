"""The learner of DPO / BVPO jobs: a DeepSpeed engine applying ALGORITHMS.md §DPO / §BVPO.3 updates.

Per step, for a batch of :class:`~rl_service.data.preferences.TokenizedPair` (one prompt each, both
modes for BVPO, trace only for DPO):

1. reference log-probs ``log π_ref`` of every completion, summed over completion tokens, from a
   frozen copy of the initial model, computed once per pair id and cached (§DPO);
2. with ``alpha_mode: online``, α̂ (§BVPO.6): per prompt, the gradients of its K resampled trace
   pairs, and the batch's empty-trace gradient, on a cheap parameter subset — the output head's rows
   of the tokens the step's completions use — feed
   :class:`~rl_service.algorithms.preference.OnlineAlphaEstimator`;
3. ``L = α L_t + (1 − α) L_e`` over micro-batches of pairs (DPO is α = 1 on the trace pairs alone):
   ``same_prompts`` — :func:`bvpo_loss`, each micro-batch weighted by its share of the batch;
   ``per_term`` — :func:`bvpo_per_term_loss`, each term a mean over its own pairs (a prompt may
   have a pair in one mode only); either way the accumulated gradient is the whole batch's; one
   optimizer step.

A non-finite loss (or, at ZeRO 0, gradient) skips the step: the gradients are discarded, the
weights are not touched, and the skip is counted. No Ray here: `actors/learner.py` wraps it (the LearnerActor of a preference job).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from collections import OrderedDict
from dataclasses import replace

import torch

from rl_service.algorithms.logprobs import token_log_probs
from rl_service.algorithms.preference import (OnlineAlphaEstimator, PreferenceLogps, bvpo_loss, bvpo_per_term_loss,
                                              dpo_loss, per_term_alpha, per_term_trains)
from rl_service.config import JobConfig
from rl_service.data.preferences import PairSelection, PreferenceRow, TokenizedPair, pairs_from_rollout, tokenize_row
from rl_service.training.engine import EngineWeights, build_engine, reference_policy
from rl_service.training.state import load_learner_state, save_learner_state

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


def _pair_sequences(pair: TokenizedPair) -> list[tuple[int, list[int], list[int]]]:
    """(column, prompt, completion) of each sequence the pair has: a mode without a pair (DPO's empty
    mode, or one mode under ``per_term``) has none."""
    sequences = []
    if pair.trace_chosen is not None:
        sequences += [(TRACE_CHOSEN, pair.trace_prompt, pair.trace_chosen), (TRACE_REJECTED, pair.trace_prompt, pair.trace_rejected)]
    if pair.empty_chosen is not None:
        sequences += [(EMPTY_CHOSEN, pair.empty_prompt, pair.empty_chosen), (EMPTY_REJECTED, pair.empty_prompt, pair.empty_rejected)]
    return sequences


def _table(pairs: list[TokenizedPair], model, pad_token_id: int) -> torch.Tensor:
    """[B, 4] summed log-probs of every pair's sequences under `model` (NaN where a pair has no
    such sequence), in one forward."""
    flat = [(row, column, prompt, completion) for row, pair in enumerate(pairs)
            for column, prompt, completion in _pair_sequences(pair)]
    logps = sequence_logps(model, [f[2] for f in flat], [f[3] for f in flat], pad_token_id)
    table = torch.full((len(pairs), 4), math.nan, dtype=logps.dtype)
    rows, columns = torch.tensor([f[0] for f in flat]), torch.tensor([f[1] for f in flat])
    return table.index_put((rows, columns), logps)


def _mode(pairs: list[TokenizedPair], table: torch.Tensor, reference: torch.Tensor, empty: bool) -> PreferenceLogps:
    """The pairs of one mode: the rows of the pairs that have one in that mode."""
    chosen, rejected = (EMPTY_CHOSEN, EMPTY_REJECTED) if empty else (TRACE_CHOSEN, TRACE_REJECTED)
    present = torch.tensor([(pair.empty_chosen if empty else pair.trace_chosen) is not None for pair in pairs],
                           dtype=torch.bool)
    return PreferenceLogps(table[present, chosen], table[present, rejected], reference[present, chosen],
                           reference[present, rejected])


def _weighted_modes_only(pairs: list[TokenizedPair], reference: torch.Tensor, alpha: float):
    """The pairs (and their reference rows) without the mode whose weight is 0 (α = 0: no trace
    term, α = 1: no empty term); prompts left with no pair are dropped."""
    if 0.0 < alpha < 1.0:
        return pairs, reference
    drop = ("trace_prompt", "trace_chosen", "trace_rejected") if alpha == 0.0 else ("empty_prompt", "empty_chosen", "empty_rejected")
    kept, rows = [], []
    for row, pair in enumerate(pairs):
        stripped = replace(pair, **{name: None for name in drop})
        if stripped.trace_chosen is not None or stripped.empty_chosen is not None:
            kept.append(stripped)
            rows.append(row)
    return kept, reference[rows]


REFERENCE_CACHE_FILE = "reference_cache.safetensors"


class PreferenceLearner(EngineWeights):
    def __init__(self, config: JobConfig, resume_from: str | Path | None = None):
        """`resume_from`: a checkpoint directory (:meth:`save_checkpoint`) whose weights, optimizer
        state, LR schedule, RNG, counters, α̂ moving averages and reference cache this learner
        continues from; π_ref still comes from `model.path` (it is the initial policy)."""
        self.config = config
        self.tokenizer, self.engine = build_engine(config, resume_from)
        self.pad_token_id = self.tokenizer.pad_token_id
        # π_ref is the initial policy, frozen (§DPO); on the learner: the models here are small.
        self.reference_model = reference_policy(config, self.engine)
        preference = config.preference
        self.with_empty = config.algorithm.name == "bvpo"   # dpo: trace-only, i.e. BVPO with α = 1
        self.beta = preference.beta
        self.fixed_alpha = preference.alpha if self.with_empty else 1.0
        self.alpha_estimator = (OnlineAlphaEstimator(preference.alpha_ema, preference.alpha_min, preference.alpha_max)
                                if preference.alpha_mode == "online" and self.with_empty else None)
        self.pairing = preference.pairing
        # Pairs per micro-batch: 4 sequences each for bvpo, 2 for dpo.
        self.pairs_per_micro = max(1, config.learner.micro_batch_size // (4 if self.with_empty else 2))
        self.reference_cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._tokenized_rows: dict[int, TokenizedPair] = {}   # offline rows, tokenized once each
        self.cache_size = preference.reference_cache_size
        self.counters = {"nan_skipped_steps": 0, "optimizer_steps": 0, "reference_cache_hits": 0,
                         "reference_pairs_computed": 0}
        if resume_from is not None:
            self._restore(Path(resume_from))

    # -- reference log-probs, once per pair (§DPO) -----------------------------------------------
    @torch.no_grad()
    def reference_logps(self, pairs: list[TokenizedPair]) -> torch.Tensor:
        """[B, 4] cached log π_ref of (trace chosen, trace rejected, empty chosen, empty rejected); NaN
        where the pair has no such sequence (trace-only DPO's empty mode, one mode under per_term)."""
        # Once per pair id, even when a batch that crosses an epoch holds a row twice.
        missing = list({pair.pair_id: pair for pair in pairs if pair.pair_id not in self.reference_cache}.values())
        self.counters["reference_cache_hits"] += len(pairs) - len(missing)
        for start in range(0, len(missing), self.pairs_per_micro):
            micro = missing[start:start + self.pairs_per_micro]
            for pair, row in zip(micro, _table(micro, self.reference_model, self.pad_token_id)):
                self.reference_cache[pair.pair_id] = row
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
        """([B, K, P] gradients of each prompt's K resampled trace pairs, one DPO pair each; [P] the
        batch's empty-trace DPO gradient) on the output head's rows R of the tokens used by the
        step's completions, in float64.

        Closed form, so B·K per-pair gradients cost one pass: with hidden states h_t (the body runs
        without a graph) and p_t = softmax(W h_t), a sequence's ∇_W log π = Σ_t (e_{y_t} − p_t) h_tᵀ
        (rows R), and a pair's DPO gradient is −β σ(−h) (∇ log π(y_w) − ∇ log π(y_l)) (§DPO).
        """
        module = self.engine.module
        # Under LoRA the head is frozen, its gradient still the same cheap proxy of the pair variance.
        module = module.get_base_model() if hasattr(module, "get_base_model") else module   # peft's wrapper off
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
        trace_slots = torch.tensor([[(slot(pair.trace_prompt, c), slot(pair.trace_prompt, r))
                                     for c, r in pair.trace_resamples[:num_resamples]] for pair in pairs])  # [B, K, 2]
        empty_slots = torch.tensor([(slot(pair.empty_prompt, pair.empty_chosen), slot(pair.empty_prompt, pair.empty_rejected))
                                    for pair in pairs])  # [B, 2]
        prompts, completions = [p for p, _ in sequences], [c for _, c in sequences]
        input_ids, attention_mask, completion_mask = padded_batch(prompts, completions, self.pad_token_id)
        rows = torch.unique(torch.cat([torch.tensor(c, dtype=torch.long) for c in completions]))
        with torch.no_grad():
            reference = sequence_logps(self.reference_model, prompts, completions, self.pad_token_id).double()
            hidden = module.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1].double()
            log_probs = torch.log_softmax(hidden @ head.weight.detach().double().T, -1)        # [S, T, V]
            labels = input_ids[:, 1:]
            policy = (log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * completion_mask.double()).sum(-1)
            # (e_y − p) on the rows R only, masked to completion tokens: [S, T, |R|]
            residual = (labels.unsqueeze(-1) == rows).double() - log_probs[..., rows].exp()
            residual = residual * completion_mask.double().unsqueeze(-1)
            per_sequence = torch.einsum("str,sth->srh", residual, hidden).flatten(1)          # [S, |R|·H]

            def pair_gradients(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
                margin = self.beta * ((policy[chosen] - reference[chosen]) - (policy[rejected] - reference[rejected]))
                weight = -self.beta * torch.sigmoid(-margin)
                return weight.unsqueeze(-1) * (per_sequence[chosen] - per_sequence[rejected])

            trace_grads = pair_gradients(trace_slots[..., 0], trace_slots[..., 1])          # [B, K, P]
            empty_grad = pair_gradients(empty_slots[:, 0], empty_slots[:, 1]).mean(0)        # [P]
        return trace_grads, empty_grad

    def _update_alpha(self, pairs: list[TokenizedPair]) -> dict[str, float]:
        """α̂ from the prompts with a pair in both modes (the bias ‖b_e‖² compares the two estimators
        on the same prompts); no update in a step without one."""
        if self.alpha_estimator is None:
            return {}
        both = [pair for pair in pairs if pair.empty_chosen is not None and len(pair.trace_resamples) >= 2]
        skipped = {**self.alpha_estimator.metrics(), "alpha_update_skipped": 1.0}   # α̂ is logged every step
        if not both:
            return skipped
        trace_grads, empty_grad = self._head_subset_gradients(both)
        if not (torch.isfinite(trace_grads).all() and torch.isfinite(empty_grad).all()):
            return skipped  # a NaN gradient must not poison the EMAs
        self.alpha_estimator.update(trace_grads, empty_grad)
        return {**self.alpha_estimator.metrics(), "alpha_subset_size": float(empty_grad.numel()),
                "alpha_prompts": float(len(both))}

    # -- one step ---------------------------------------------------------------------------
    def _micro_loss(self, pairs: list[TokenizedPair], reference: torch.Tensor, alpha: float, totals: tuple[int, int]):
        """The micro-batch's share of the step's loss, and its (trace, empty) policy log-probs."""
        policy = _table(pairs, self.engine, self.pad_token_id)
        trace = _mode(pairs, policy, reference, empty=False)
        if not self.with_empty:
            loss, _ = dpo_loss(trace.policy_chosen_logps, trace.policy_rejected_logps, trace.ref_chosen_logps,
                               trace.ref_rejected_logps, beta=self.beta)
            return loss * (len(pairs) / totals[0]), trace, None
        empty = _mode(pairs, policy, reference, empty=True)
        if self.pairing == "same_prompts":
            loss, _ = bvpo_loss(trace, empty, alpha, self.beta)
            return loss * (len(pairs) / totals[0]), trace, empty
        return bvpo_per_term_loss(trace, empty, alpha, self.beta, *totals), trace, empty

    def _loss_metrics(self, trace: list[PreferenceLogps], empty: list[PreferenceLogps], alpha: float) -> dict[str, float]:
        """§DPO metrics of each term over the whole step (not per micro-batch), prefixed by mode."""
        metrics, losses = {}, {}
        for name, parts in (("trace", trace), ("empty", empty)):
            parts = [part for part in parts if part is not None and part.policy_chosen_logps.numel()]
            if parts:
                joined = [torch.cat([getattr(part, field).detach() for part in parts]) for field in
                          ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")]
                _, mode_metrics = dpo_loss(*joined, beta=self.beta)
                metrics.update({f"{name}_{key}": value for key, value in mode_metrics.items()})
                losses[name] = mode_metrics["loss"]
        metrics["loss"] = alpha * losses.get("trace", 0.0) + (1.0 - alpha) * losses.get("empty", 0.0)
        return metrics

    def train_step(self, pairs: list[TokenizedPair]) -> dict[str, float]:
        started = time.perf_counter()
        num_trace = sum(pair.trace_chosen is not None for pair in pairs)
        num_empty = sum(pair.empty_chosen is not None for pair in pairs)
        if self.pairing == "same_prompts" and (num_trace != len(pairs) or (self.with_empty and num_empty != len(pairs))):
            raise ValueError("pairing same_prompts needs a pair in every mode for every prompt")
        # Pairs that train: a term of weight 0 (α = 0 or 1 under per_term) trains none of its pairs.
        metrics: dict[str, float] = {"pairs": float(len(pairs)), "trace_pairs": float(num_trace),
                                     "empty_pairs": float(num_empty), "skipped_step": 0.0}
        if pairs:
            reference = self.reference_logps(pairs)
            self.engine.train()
            metrics.update(self._update_alpha(pairs))
        alpha = self.alpha_estimator.alpha if self.alpha_estimator is not None else self.fixed_alpha
        per_term = self.with_empty and self.pairing == "per_term"
        if not pairs or (per_term and not per_term_trains(alpha, num_trace, num_empty)):
            metrics.update(skipped_step=1.0, alpha=alpha)   # nothing to train (e.g. α = 0 and no empty pair)
            return {**metrics, **self._counter_metrics(), "train_seconds": time.perf_counter() - started}
        effective, totals = alpha, (len(pairs), len(pairs))
        if per_term:
            # A step with no pair in one term trains on the other alone (α_eff 0 or 1), and says so;
            # a term of weight 0 is not even run forward.
            effective = per_term_alpha(alpha, num_trace, num_empty)
            metrics.update(alpha_effective=effective, trace_only_step=float(effective == 1.0),
                           empty_only_step=float(effective == 0.0))
            pairs, reference = _weighted_modes_only(pairs, reference, effective)
            totals = (sum(pair.trace_chosen is not None for pair in pairs), sum(pair.empty_chosen is not None for pair in pairs))
            metrics.update(pairs=float(len(pairs)), trace_pairs=float(totals[0]), empty_pairs=float(totals[1]))
        traces, empties = [], []
        finite = True
        for start in range(0, len(pairs), self.pairs_per_micro):
            micro = pairs[start:start + self.pairs_per_micro]
            loss, trace, empty = self._micro_loss(micro, reference[start:start + self.pairs_per_micro], effective, totals)
            if not torch.isfinite(loss):
                finite = False  # never backpropagate a NaN: it would reach the weights at step()
                break
            self.engine.backward(loss, scale_wrt_gas=False)
            traces.append(trace)
            empties.append(empty)
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
        metrics.update(self._loss_metrics(traces, empties, effective))
        metrics.update(alpha=alpha, grad_norm=grad_norm, learning_rate=float(self.engine.get_lr()[0]))
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
    def train_online(self, rollout, selection: PairSelection, first_pair_id: int) -> dict[str, float]:
        """One update on the pairs the driver selected from a step's samples (online mode)."""
        return self.train_step(pairs_from_rollout(rollout, selection, first_pair_id))

    def train_offline(self, rows: list[PreferenceRow]) -> dict[str, float]:
        """One update on dataset rows (offline mode, §BVPO.7); each row is tokenized once (its id
        keys the reference cache)."""
        for row in rows:
            if row.pair_id not in self._tokenized_rows:
                self._tokenized_rows[row.pair_id] = tokenize_row(self.tokenizer, row, self.with_empty)
        return self.train_step([self._tokenized_rows[row.pair_id] for row in rows])

    def alpha_state(self) -> dict[str, float]:
        return self.alpha_estimator.state_dict() if self.alpha_estimator is not None else {}

    def _state_layout(self) -> dict:
        return {"learner.zero_stage": self.config.learner.zero_stage, "model.dtype": self.config.model.dtype,
                "algorithm.name": self.config.algorithm.name}

    def save_checkpoint(self, directory: str | Path) -> None:
        """Weights (`model/`), optimizer + LR schedule + RNG (`training/state.py`), counters and α̂'s
        EMAs, and the reference cache in LRU order (offline pairs come back; online ones never do,
        so an online run saves none and loses nothing)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        self.save_checkpoint_weights(directory)
        counters = {**self.counters, "weight_version": self.weight_version,
                    "alpha_estimator": self.alpha_state() or None}
        save_learner_state(directory, self.engine, counters, self._state_layout())
        if self.config.preference.mode == "offline" and self.reference_cache:
            save_file({"pair_ids": torch.tensor(list(self.reference_cache), dtype=torch.int64),
                       "logps": torch.stack(list(self.reference_cache.values()))}, str(directory / REFERENCE_CACHE_FILE))

    def _restore(self, directory: Path) -> None:
        from safetensors.torch import load_file

        counters = load_learner_state(directory, self.engine, self._state_layout())
        alpha_state = counters.pop("alpha_estimator", None)
        self.weight_version = int(counters.pop("weight_version"))
        self.counters.update({key: int(value) for key, value in counters.items()})
        if self.alpha_estimator is not None and alpha_state:
            self.alpha_estimator.load_state_dict(alpha_state)
        cache = directory / REFERENCE_CACHE_FILE
        if cache.is_file():
            tensors = load_file(str(cache))
            self.reference_cache = OrderedDict(zip(tensors["pair_ids"].tolist(), tensors["logps"].unbind(0)))
