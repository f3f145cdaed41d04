"""The learner's training step: a DeepSpeed engine applying §GRPO or §RAFT (RAFT++) updates.

One rollout batch becomes `ppo_epochs × mini_batches` optimizer steps; each mini-batch is split
into micro-batches whose losses are normalised by the *mini-batch's* token (or sequence) count, so
gradient accumulation gives exactly the mini-batch gradient (ALGORITHMS.md §GRPO.5). π_old is the
policy before the first update (§GRPO.6): with one update per batch it is the current policy
detached; otherwise it is computed once, before updating.

Several ranks (`learner.num_ranks`): each takes its share of every mini-batch and of every frozen
forward, in lock step (`rl_service/training/data_parallel.py`); their gradients add up to the one-rank
gradient, and their metrics are summed before rank 0 reports them.
No Ray here: `actors/learner.py` wraps it.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from rl_service.algorithms.acceptance import acceptance_threshold, accepted
from rl_service.algorithms.advantages import (grpo_advantages, raft_expected_count_scale, raft_plus_plus_advantages,
                                               raft_plus_plus_keep_mask, zero_variance_groups)
from rl_service.algorithms.grad_norms import per_sample_embedding_grad_norms
from rl_service.algorithms.logprobs import token_log_probs
from rl_service.algorithms.policy_loss import PolicyLossConfig, loss_normalizer_for, policy_loss, prompt_mean_weights
from rl_service.config import JobConfig
from rl_service.rollout import Rollout
from rl_service.training.batch import TrainingBatch, build_training_batch, micro_batches
from rl_service.training.data_parallel import (all_gather_floats, all_reduce_metrics, all_reduce_sum_, lock_step,
                                               shard_rows, sum_gradients_)
from rl_service.training.engine import EngineWeights, build_engine, gathered, rank_and_world, reference_policy
from rl_service.training.state import load_learner_state, save_learner_state


class PolicyLearner(EngineWeights):
    def __init__(self, config: JobConfig, resume_from: str | Path | None = None):
        """`resume_from`: a checkpoint directory whose weights, optimizer state, LR schedule, RNG and
        counters this learner continues from (the reference model still comes from `model.path`)."""
        self.config = config
        self.tokenizer, self.engine = build_engine(config, resume_from)
        self.rank, self.world_size = rank_and_world()
        if config.learner.zero_stage == 0 and self.world_size > 1:
            # We sum the ranks' gradients ourselves before the norm (clip, NaN guard): see _optimizer_step.
            self.engine.enable_backward_allreduce = False
        self.reference_model = None
        if config.algorithm.kl_coef > 0:
            self.reference_model = reference_policy(config, self.engine)
        algorithm = config.algorithm
        self.loss_config = PolicyLossConfig(
            clip_low=algorithm.clip_low, clip_high=algorithm.clip_high, dual_clip=algorithm.dual_clip,
            kl_coef=algorithm.kl_coef, kl_clamp=algorithm.kl_clamp,
            kl_bias_correction=algorithm.kl_bias_correction, aggregation=algorithm.aggregation)
        self.temperature = config.generator.temperature or 1.0
        self.optimizer_steps = 0
        if resume_from is not None:
            counters = load_learner_state(resume_from, self.engine, self._state_layout(), self.rank)
            self.optimizer_steps, self.weight_version = counters["optimizer_steps"], counters["weight_version"]

    def save_checkpoint(self, directory: str | Path) -> None:
        self.save_checkpoint_weights(directory)
        save_learner_state(directory, self.engine, {"optimizer_steps": self.optimizer_steps,
                                                    "weight_version": self.weight_version}, self._state_layout(), self.rank)

    def _state_layout(self) -> dict:
        return {"learner.zero_stage": self.config.learner.zero_stage, "learner.num_ranks": self.config.learner.num_ranks,
                "model.dtype": self.config.model.dtype}

    # -- advantages -------------------------------------------------------------------------
    def advantages_and_mask(self, rollout: Rollout, rewards: torch.Tensor, train_mask: list[bool] | None = None,
                            acceptance_estimates: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Per-sample advantages and which samples train (ALGORITHMS.md §GRPO.2, §RAFT).

        `train_mask` (the driver's dynamic sampling, §DAPO): samples outside it do not train.
        `acceptance_estimates` (RAFT++ with `accepted_normaliser: expected`): p̄ per prompt of the
        rollout, from the statistics role; sets `self._sample_scale`."""
        algorithm = self.config.algorithm
        group_index = torch.tensor(rollout.request_index, dtype=torch.long)
        keep = torch.ones(len(rollout), dtype=torch.bool)
        self._sample_scale = None   # per kept row: the expected-count factor of accepted_normaliser 'expected'
        if train_mask is not None:
            keep &= torch.tensor(train_mask, dtype=torch.bool)
        metrics: dict[str, float] = {}
        if self.config.statistics.skip_singleton_groups:
            # GVM can give a prompt one sample; §GVM.7 lets us drop such groups (ours).
            group_sizes = torch.bincount(group_index)
            keep &= group_sizes[group_index] >= 2
        if algorithm.name == "grpo":
            advantages = grpo_advantages(rewards, group_index, epsilon=algorithm.advantage_epsilon,
                                         scale_rewards=algorithm.scale_rewards)
            flat_groups = zero_variance_groups(rewards, group_index)
            metrics["zero_variance_sample_fraction"] = float(flat_groups.float().mean())
            if algorithm.filter_zero_variance_groups:
                # §GRPO.2: report how many groups the filter dropped (of those still in the batch).
                dropped = torch.unique(group_index[keep & flat_groups])
                metrics["zero_variance_groups_dropped"] = float(dropped.numel())
                keep &= ~flat_groups
        else:
            threshold = acceptance_threshold(self.config)
            advantages = raft_plus_plus_advantages(rewards, threshold)
            eligible = keep.clone()
            keep &= raft_plus_plus_keep_mask(rewards, algorithm.drop_rejected, threshold)
            # Prompts with no accepted sample: no row trains, but prompt_mean still counts them (§GVM.2).
            had_rows = torch.zeros(int(group_index.max()) + 1, dtype=torch.bool).index_fill_(0, group_index[eligible], True)
            kept_rows = torch.zeros_like(had_rows).index_fill_(0, group_index[keep], True)
            metrics["all_rejected_prompts"] = float((had_rows & ~kept_rows).sum())
            if algorithm.accepted_normaliser == "expected":
                if acceptance_estimates is None:
                    raise ValueError("algorithm.accepted_normaliser 'expected' needs the statistics role's acceptance "
                                     "estimate of every prompt of the step")
                estimate = torch.tensor(acceptance_estimates, dtype=torch.float64)
                self._sample_scale = raft_expected_count_scale(accepted(rewards, threshold), group_index, eligible,
                                                               estimate)
                # a / (n p̄): how far the accepted counts sit from what p̄ expected, averaged over the
                # prompts that have an estimate and an accepted sample.
                rows = keep & ~torch.isnan(estimate[group_index])
                if bool(rows.any()):
                    per_prompt = torch.zeros_like(estimate).index_copy_(0, group_index[rows], self._sample_scale[rows])
                    metrics["accepted_over_expected"] = float(per_prompt[torch.unique(group_index[rows])].mean())
        if self._sample_scale is not None:
            self._sample_scale = self._sample_scale[keep]
        metrics["trained_samples"] = float(keep.sum())
        return advantages, keep, metrics

    # -- one batch of rollouts ----------------------------------------------------------------
    def _token_logprobs(self, model, batch: TrainingBatch) -> torch.Tensor:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        return token_log_probs(logits, batch.input_ids[:, 1:], temperature=self.temperature)

    def _micro_batches(self, batch: TrainingBatch, rows: torch.Tensor) -> list[torch.Tensor | None]:
        """This rank's micro-batches of `rows`, in lock step with the other ranks (None: an idle pass)."""
        learner = self.config.learner
        lengths = batch.attention_mask.sum(dim=1)
        per_rank = [micro_batches(batch, shard, learner.micro_batch_size, learner.group_by_length)
                    for shard in shard_rows(rows, lengths, self.world_size)]
        return lock_step(per_rank, self.rank)

    def _rows_with_gradient(self, batch: TrainingBatch, rows: torch.Tensor) -> torch.Tensor:
        """The rows of `rows` whose loss has a gradient.

        With no KL term a sample of advantage 0 (a GRPO group whose rewards are all equal, a RAFT++
        rejection) adds exactly 0 to the §GRPO.3 surrogate and to its gradient, at any ratio and
        with either clip; it still counts in the §GRPO.5 normaliser, which the caller takes over all
        of `rows`. So the forward and backward passes can skip it and the update stays the same. An
        all-zero mini-batch keeps one row, so the optimizer still steps on (zero) gradients, as it would."""
        if not self.config.learner.skip_zero_advantage or self.reference_model is not None:
            return rows
        active = rows[batch.advantages[rows] != 0]
        return active if len(active) else rows[:1]

    @torch.no_grad()
    def _frozen_logprobs(self, model, batch: TrainingBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
        rows = torch.arange(len(batch)) if rows is None else rows
        logprobs = torch.zeros_like(batch.completion_mask)
        for micro_rows in self._micro_batches(batch, rows):
            if micro_rows is None:   # idle pass: the forward's ZeRO-3 gathers, nothing kept
                self._token_logprobs(model, batch.select(rows[:1]))
                continue
            micro_logprobs = self._token_logprobs(model, batch.select(micro_rows))
            logprobs[micro_rows, :micro_logprobs.shape[1]] = micro_logprobs
        return all_reduce_sum_(logprobs * batch.completion_mask)   # each row was filled by one rank

    def train_step(self, rollout: Rollout, rewards: list[float], train_mask: list[bool] | None = None,
                   acceptance_estimates: list[float] | None = None) -> dict[str, float]:
        started = time.perf_counter()
        learner = self.config.learner
        # float64, as the driver, the statistics and the §GVM.1 norms read them: one acceptance everywhere.
        reward_tensor = torch.tensor(rewards, dtype=torch.float64)
        advantages, keep, metrics = self.advantages_and_mask(rollout, reward_tensor, train_mask, acceptance_estimates)
        if not bool(keep.any()):
            metrics.update(skipped_step=1.0, train_seconds=time.perf_counter() - started)
            return metrics
        batch = build_training_batch(rollout, advantages, keep, self.tokenizer.pad_token_id)
        # Each kept row's prompt: the prompt_mean aggregation weighs prompts, not samples.
        self._row_groups = torch.tensor(rollout.request_index, dtype=torch.long)[keep]
        self._absent_prompts = metrics.get("all_rejected_prompts", 0.0)
        self.engine.train()
        single_update = learner.mini_batches == 1 and learner.ppo_epochs == 1
        old_logprobs = None if single_update else self._frozen_logprobs(
            self.engine, batch, self._rows_with_gradient(batch, torch.arange(len(batch))))
        ref_logprobs = self._frozen_logprobs(self.reference_model, batch) if self.reference_model is not None else None

        sums: dict[str, float] = {}
        count = 0
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.optimizer_steps)
        for _ in range(learner.ppo_epochs):
            order = torch.randperm(len(batch), generator=generator) if not single_update else torch.arange(len(batch))
            for mini_rows in torch.tensor_split(order, min(learner.mini_batches, len(batch))):
                step_metrics = self._optimizer_step(batch, mini_rows, old_logprobs, ref_logprobs)
                for key, value in step_metrics.items():
                    sums[key] = sums.get(key, 0.0) + value
                count += 1
        metrics.update({key: value / count for key, value in sums.items()})
        if self.world_size > 1:
            rank_seconds = all_gather_floats(time.perf_counter() - started)
            metrics.update({f"train_seconds_rank_{rank}": seconds for rank, seconds in enumerate(rank_seconds)})
            metrics["train_seconds_rank_spread"] = max(rank_seconds) - min(rank_seconds)
        metrics["stale_sample_fraction"] = float((batch.weight_versions < self.weight_version).float().mean())
        metrics["optimizer_steps"] = float(count)
        metrics["learning_rate"] = float(self.engine.get_lr()[0])
        metrics["train_seconds"] = time.perf_counter() - started
        return metrics

    def _optimizer_step(self, batch: TrainingBatch, mini_rows: torch.Tensor, old_logprobs, ref_logprobs) -> dict[str, float]:
        aggregation = self.config.algorithm.aggregation
        normalizer = loss_normalizer_for(batch.completion_mask[mini_rows], aggregation)
        weights = None
        if aggregation == "prompt_mean":   # over the whole mini-batch, indexed by row
            weights = torch.zeros(len(batch), dtype=torch.float64)
            # All-rejected prompts have no row: each mini-batch counts its share of them.
            absent = self._absent_prompts * len(mini_rows) / len(batch)
            weights[mini_rows] = prompt_mean_weights(batch.completion_mask[mini_rows], self._row_groups[mini_rows], absent)
            if self._sample_scale is not None:   # a_i / (n_i p̄_i): §GVM.2's estimator (advantages.py)
                weights[mini_rows] *= self._sample_scale[mini_rows]
        active_rows = self._rows_with_gradient(batch, mini_rows)
        # Keys summed over the ranks (each rank adds its rows' share); the rest are the same on every rank.
        totals: dict[str, float] = {"loss": 0.0, "behaviour_logprob_abs_diff": 0.0,
                                    "padded_positions": 0.0, "real_positions": 0.0}
        summed = set(totals)
        # Token-mean metrics (clip fractions, ratio, log-prob gap) are over the tokens forwarded.
        tokens = float(batch.completion_mask[active_rows].sum())
        # ZeRO 1-3 average the ranks' gradients; ours are shares of one sum, so scale them back up.
        # (ZeRO 0 on several ranks sums them itself below.)
        rank_scale = self.world_size if self.config.learner.zero_stage > 0 else 1
        for micro_rows in self._micro_batches(batch, active_rows):
            idle = micro_rows is None
            if idle:   # the same passes as the busiest rank (ZeRO 2-3 collectives), contributing zero
                micro_rows = mini_rows[:1]
            micro = batch.select(micro_rows)
            width = micro.completion_mask.shape[1]
            logprobs = self._token_logprobs(self.engine, micro)
            old = logprobs.detach() if old_logprobs is None else old_logprobs[micro_rows][:, :width]
            stale = micro.weight_versions < self.weight_version
            if bool(stale.any()):
                # A sample drawn by an older policy (async mode): π_old of the §GRPO.3 ratio is the
                # policy that sampled it, whose log-probs the generator returned with the tokens.
                old = torch.where(stale[:, None], micro.behaviour_logprobs, old)
            ref = None if ref_logprobs is None else ref_logprobs[micro_rows][:, :width]
            loss, loss_metrics = policy_loss(logprobs, old, micro.advantages, micro.completion_mask, self.loss_config,
                                             ref_logprobs=ref, loss_normalizer=normalizer,
                                             sequence_weights=None if weights is None else weights[micro_rows])
            if idle:
                loss = loss * 0.0
            elif rank_scale != 1:
                loss = loss * rank_scale
            self.engine.backward(loss, scale_wrt_gas=False)
            share = 0.0 if idle else float(micro.completion_mask.sum()) / max(tokens, 1.0)
            for key, value in loss_metrics.items():
                if key not in ("loss", "num_tokens"):  # token means: weight by this micro-batch's share
                    totals[key] = totals.get(key, 0.0) + value * share
                    summed.add(key)
            if idle:
                continue
            totals["padded_positions"] += micro.attention_mask.numel()
            totals["real_positions"] += int(micro.attention_mask.sum())
            totals["loss"] += float(loss.detach()) / rank_scale
            # How far the generator's log-probs are from the learner's: a health check of the sync.
            diff = ((micro.behaviour_logprobs - logprobs.detach()).abs() * micro.completion_mask).sum()
            totals["behaviour_logprob_abs_diff"] += float(diff) / max(tokens, 1.0)
        totals = all_reduce_metrics(totals, summed)
        # ZeRO 1-3 report the (pre-clip) global norm after step(); stage 0 reports none, so take it here.
        own_norm = None
        if self.config.learner.zero_stage == 0:
            parameters = [p for p in self.engine.module.parameters() if p.requires_grad]
            sum_gradients_(parameters)
            grads = [p.grad for p in parameters if p.grad is not None]
            own_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            if not math.isfinite(own_norm):
                # NaN/Inf guard: drop the gradients, so AdamW leaves every parameter and its moments
                # as they were. ZeRO 1-3 do the same themselves (an invalid global norm is an
                # "overflow": the step is skipped and the norm reported as inf).
                for parameter in self.engine.module.parameters():
                    parameter.grad = None
        self.engine.step()
        self.optimizer_steps += 1
        grad_norm = own_norm if own_norm is not None else self.engine.get_global_grad_norm()
        padded, real = totals.pop("padded_positions"), totals.pop("real_positions")
        totals["forward_sample_fraction"] = len(active_rows) / max(len(mini_rows), 1)
        totals["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        totals["nonfinite_update_fraction"] = float(grad_norm is not None and not math.isfinite(grad_norm))
        totals["padding_fraction"] = 1.0 - real / max(padded, 1)
        return totals

    def completion_logprobs(self, rollout: Rollout) -> list[list[float]]:
        """Per sample, the learner's log-probs of its completion tokens at the sampling temperature:
        what the generator that drew them reported, when both hold the same weights (the sync check)."""
        keep = torch.ones(len(rollout), dtype=torch.bool)
        batch = build_training_batch(rollout, torch.zeros(len(rollout)), keep, self.tokenizer.pad_token_id)
        self.engine.eval()
        logprobs = self._frozen_logprobs(self.engine, batch)
        return [logprobs[row][batch.completion_mask[row] > 0].tolist() for row in range(len(batch))]

    # -- GVM statistics ----------------------------------------------------------------------
    def accepted_grad_norms(self, rollout: Rollout, rewards: list[float]) -> list[float]:
        """Per-sample ‖∇_E(−Σ_t log π_θ(y_t|·))‖₂ of accepted samples, NaN for rejected (ALGORITHMS.md §GVM.1).

        Batched (one forward and one autograd.grad per micro-batch, no per-sample backward), at
        temperature 1 (the policy itself), on the weights that generated the samples.
        """
        accepted_samples = torch.as_tensor(accepted(rewards, acceptance_threshold(self.config)), dtype=torch.bool)
        norms = torch.full((len(rollout),), float("nan"), dtype=torch.float64)
        if not bool(accepted_samples.any()):
            return norms.tolist()
        batch = build_training_batch(rollout, torch.zeros(len(rollout)), accepted_samples, self.tokenizer.pad_token_id)
        accepted_norms = torch.zeros(len(batch), dtype=torch.float64)
        module = self.engine.module
        # §GVM.1 reads the embedding (and a tied head) itself: under ZeRO-3 it is gathered for the pass.
        embedding_and_head = [module.get_input_embeddings().weight, module.get_output_embeddings().weight]
        with gathered(embedding_and_head, self.config.learner.zero_stage):
            for micro_rows in self._micro_batches(batch, torch.arange(len(batch))):
                idle = micro_rows is None
                micro = batch.select(torch.arange(1) if idle else micro_rows)
                micro_norms = per_sample_embedding_grad_norms(
                    module, micro.input_ids, micro.attention_mask, micro.completion_mask).to(torch.float64)
                if not idle:
                    accepted_norms[micro_rows] = micro_norms
        all_reduce_sum_(accepted_norms)   # each row was filled by one rank
        # NaN marks "rejected" downstream; a non-finite norm of an accepted sample is a numerical
        # failure, reported as inf so the statistics actor drops and counts it (never averages it in).
        norms[accepted_samples] = torch.where(torch.isfinite(accepted_norms), accepted_norms, torch.inf)
        return norms.tolist()

