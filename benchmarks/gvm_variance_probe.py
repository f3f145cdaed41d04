"""The in-process machinery of `benchmarks/gvm_variance.py`: one frozen policy, the project's torch
generation engine and verifier, and the learner's own gradient (no Ray: everything in this process).

`CapturedGradient` runs `PolicyLearner.train_step` unchanged (advantages, masks, the §GRPO.5
normaliser, micro-batches, skipped zero-advantage rows) and replaces only the DeepSpeed engine's
`step()`: it copies the accumulated gradient out and clears it, so the weights never move and every
draw sees the same frozen policy. ZeRO stage 0 (one rank): the gradient is the one ZeRO 1 would
reduce; only where it is stored differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rl_service.config import JobConfig, load_config
from rl_service.generation.torch_engine import TorchGenerationEngine
from rl_service.rewards.verifiers import score_batch
from rl_service.rollout import GenerationRequest, Rollout, SamplingParams
from rl_service.tasks import PromptTokenizer, load_task
from rl_service.training.batch import build_training_batch
from rl_service.training.policy_learner import PolicyLearner

REPO = Path(__file__).resolve().parents[1]


def job_config(model_path: str, algorithm: str, extra: list[str] = ()) -> JobConfig:
    """The quickstart job on `model_path`, one rank at ZeRO 0, sync (the learner's settings otherwise)."""
    return load_config(REPO / "configs" / "quickstart.yaml",
                       [f"model.path={model_path}", f"algorithm.name={algorithm}", "learner.zero_stage=0",
                        "schedule.mode=sync", *extra])


LOSSES = ("shipped", "token_mean")


def learner_loss(algorithm: str, loss: str) -> list[str]:
    """The learner's loss overrides: `token_mean`, the quickstart's (§GRPO.5); `shipped`, the one
    configs/gvm_grpo.yaml or configs/gvm_raft.yaml trains with (prompt mean; RAFT++ over accepted
    samples), the estimator a GVM user's allocation acts on."""
    if loss == "token_mean":
        return []
    if loss != "shipped":
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    shipped = load_config(REPO / "configs" / ("gvm_grpo.yaml" if algorithm == "grpo" else "gvm_raft.yaml")).algorithm
    overrides = [f"algorithm.aggregation={shipped.aggregation}"]
    if algorithm != "grpo":   # a RAFT++ setting: GRPO has no rejected samples to drop
        overrides.append(f"algorithm.drop_rejected={str(shipped.drop_rejected).lower()}")
    return overrides


class CapturedGradient:
    """The learner's gradient of one batch, flattened over every parameter (float32 [D])."""

    def __init__(self, config: JobConfig):
        self.learner = PolicyLearner(config)
        self.parameters = [p for p in self.learner.engine.module.parameters() if p.requires_grad]
        self.size = sum(p.numel() for p in self.parameters)
        self._captured: torch.Tensor | None = None
        self.learner.engine.step = self._capture   # the only change: read the gradient instead of applying it

    def _capture(self, *args, **kwargs) -> None:
        self._captured = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                    for p in self.parameters]).clone()
        for parameter in self.parameters:
            parameter.grad = None

    def __call__(self, rollout: Rollout, rewards: list[float], acceptance_estimates=None) -> tuple[torch.Tensor, dict]:
        self._captured = None
        estimates = None if acceptance_estimates is None else np.asarray(acceptance_estimates, dtype=np.float64).tolist()
        metrics = self.learner.train_step(rollout, rewards, acceptance_estimates=estimates)
        if self._captured is None:   # nothing trained (every sample masked out): the update is zero
            return torch.zeros(self.size), metrics
        return self._captured, metrics


@dataclass
class DrawResult:
    rollout: Rollout
    rewards: np.ndarray            # [n] 0/1
    counts: np.ndarray             # [B] samples per prompt


class FrozenPolicy:
    """One snapshot: a generator, the GRPO and RAFT++ learners (same weights) and the fixed prompts."""

    def __init__(self, model_path: str, num_prompts: int, loss: str = "shipped"):
        self.loss = loss
        self.grpo = CapturedGradient(job_config(model_path, "grpo", learner_loss("grpo", loss)))
        self.raft = CapturedGradient(job_config(model_path, "raft++", learner_loss("raft", loss)))
        # §GVM.2's estimator: the shipped loss with each prompt divided by n_i·p̄_i (needs the prompt mean)
        self.raft_expected = (CapturedGradient(job_config(model_path, "raft++", learner_loss("raft", loss)
                                                          + ["algorithm.accepted_normaliser=expected"]))
                              if loss == "shipped" else None)
        config = self.grpo.learner.config
        self.engine = TorchGenerationEngine(model_path, config.model.dtype, config.model.trust_remote_code)
        generator = config.generator
        self.sampling = SamplingParams(generator.temperature, generator.top_p, generator.max_new_tokens)
        # The held-out eval prompts: levels 1-5 round robin, never trained on by either snapshot.
        records = load_task(config).eval[:num_prompts]
        tokenize = PromptTokenizer(self.grpo.learner.tokenizer, config.model.thinking)
        self.prompt_tokens = [tokenize(record) for record in records]
        self.prompt_ids = [record.prompt_id for record in records]
        self.groups = [record.group for record in records]   # difficulty levels (statistics.unseen_prompts: group)
        self.answers = [record.answer for record in records]
        self.verifier = "integer"
        self.num_prompts = len(records)

    def draw(self, counts, seed: int) -> DrawResult:
        counts = np.asarray(counts, dtype=np.int64)
        requests = [GenerationRequest(i, self.prompt_ids[i], self.prompt_tokens[i], int(n)) for i, n in enumerate(counts)]
        rollout = self.engine.generate(requests, self.sampling, seed)
        rewards = score_batch(rollout.completion_texts, [self.answers[i] for i in rollout.request_index], self.verifier)
        return DrawResult(rollout, np.asarray(rewards, dtype=np.float64), counts)

    def prompt_statistics(self, result: DrawResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(accepted count, samples, mean §GVM.1 embedding-gradient norm over accepted or NaN) per prompt,
        the norms from the learner's own `accepted_grad_norms`."""
        group = np.asarray(result.rollout.request_index, dtype=np.int64)
        accepted = np.bincount(group, weights=(result.rewards == 1).astype(float), minlength=self.num_prompts)
        norms = np.asarray(self.raft.learner.accepted_grad_norms(result.rollout, result.rewards.tolist()), dtype=np.float64)
        finite = np.isfinite(norms)
        total = np.bincount(group[finite], weights=norms[finite], minlength=self.num_prompts)
        count = np.bincount(group[finite], minlength=self.num_prompts)
        grad = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        return accepted, result.counts.astype(np.float64), grad

    def per_sample_gradients(self, rollout: Rollout, rows) -> torch.Tensor:
        """[len(rows), D] float32: v_j = ∇_θ Σ_t log π_θ(y_jt | ·) of each sample, the learner's log-probs
        (its temperature, its completion mask), one backward per sample."""
        learner = self.grpo.learner
        module = learner.engine.module
        batch = build_training_batch(rollout, torch.zeros(len(rollout)), torch.ones(len(rollout), dtype=torch.bool),
                                     learner.tokenizer.pad_token_id)
        out = torch.empty((len(rows), self.grpo.size), dtype=torch.float32)
        for k, row in enumerate(rows):
            micro = batch.select(torch.tensor([int(row)]))
            logprobs = learner._token_logprobs(module, micro)
            grads = torch.autograd.grad((logprobs * micro.completion_mask).sum(), self.grpo.parameters, allow_unused=True)
            out[k] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                for g, p in zip(grads, self.grpo.parameters)])
        return out


def subset(rollout: Rollout, rows) -> Rollout:
    """The samples `rows` of a rollout, in that order (repeats allowed), prompt indices kept."""
    part = Rollout()
    for name in part.__dataclass_fields__:
        values = getattr(rollout, name)
        getattr(part, name).extend([values[int(row)] for row in rows] if values else [])
    return part
