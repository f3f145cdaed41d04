"""Checkpoints hold the learner's whole training state (optimizer, schedule, RNG, counters) without
pickle, and a learner restored from one continues bit for bit; the NaN/Inf guard skips updates."""
from __future__ import annotations

import pytest
import torch

from rl_service.config import load_config
from rl_service.rollout import GenerationRequest, SamplingParams
from rl_service.tasks import PromptTokenizer
from rl_service.data.arithmetic import make_arithmetic_split
from rl_service.data.prompts import PromptRecord


@pytest.fixture(scope="module")
def rollout():
    from rl_service.generation.hf_engine import HFGenerationEngine

    engine = HFGenerationEngine("builtin")
    train, _ = make_arithmetic_split(seed=7, num_train=4, num_eval=1, levels=[1, 2])
    tokenize = PromptTokenizer(engine.tokenizer, thinking=True)
    requests = [GenerationRequest(k, p.prompt_id, tokenize(PromptRecord(p.prompt_id, p.question, p.answer)), 4)
                for k, p in enumerate(train)]
    return engine.generate(requests, SamplingParams(max_new_tokens=24), seed=2)


def _learner(stage: int, resume_from=None):
    from rl_service.training.policy_learner import PolicyLearner

    config = load_config(None, [f"learner.zero_stage={stage}", "learner.lr=1e-3", "learner.micro_batch_size=8",
                                "learner.warmup_steps=3", "learner.mini_batches=2", "learner.ppo_epochs=2"])
    return PolicyLearner(config, resume_from)


def _params(learner) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in learner.engine.module.named_parameters()}


def _rewards(rollout, step: int) -> list[float]:
    return [float((k + step) % 3 == 0) for k in range(len(rollout))]


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_a_restored_learner_continues_bit_for_bit(rollout, tmp_path, stage):
    original = _learner(stage)
    for step in (1, 2):
        original.train_step(rollout, _rewards(rollout, step))
    original.flat_weights(version=2)
    original.save_checkpoint(tmp_path)
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.bin"))   # nothing to unpickle

    restored = _learner(stage, resume_from=tmp_path)
    assert restored.optimizer_steps == original.optimizer_steps == 8 and restored.weight_version == 2
    assert restored.engine.get_lr() == original.engine.get_lr()                # mid warm-up: the schedule moved
    # Step 3 on both: same loss, same weights, to the bit (moments, schedule and counters all restored).
    expected = original.train_step(rollout, _rewards(rollout, 3))
    got = restored.train_step(rollout, _rewards(rollout, 3))
    assert got["loss"] == expected["loss"] and got["learning_rate"] == expected["learning_rate"]
    want = _params(original)
    for name, value in _params(restored).items():
        assert torch.equal(value, want[name]), name


def test_restoring_onto_another_zero_stage_is_refused_by_name(rollout, tmp_path):
    learner = _learner(1)
    learner.train_step(rollout, _rewards(rollout, 1))
    learner.save_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="learner.zero_stage 1, this learner has 0"):
        _learner(0, resume_from=tmp_path)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_a_non_finite_gradient_skips_the_update_and_is_counted(rollout, stage):
    learner = _learner(stage)
    before = _params(learner)
    # A finite reward whose group variance overflows float64 makes the group's advantages NaN.
    rewards = [1e300 if k % 4 == 0 else 0.0 for k in range(len(rollout))]
    metrics = learner.train_step(rollout, rewards)
    assert metrics["nonfinite_update_fraction"] == 1.0
    for name, value in _params(learner).items():
        assert torch.equal(value, before[name]), name                       # no update reached the weights
    healthy = learner.train_step(rollout, _rewards(rollout, 1))
    assert healthy["nonfinite_update_fraction"] == 0.0
    assert any(not torch.equal(value, before[name]) for name, value in _params(learner).items())
