"""LoRA end to end on real Ray + DeepSpeed + the shipped model (configs/lora.yaml): a GRPO run that
trains only adapters learns, the generators serve exactly the merged weights the learner trains, and
the checkpointed adapter loads in peft (a killed LoRA run resuming: tests/test_resume.py)."""
from __future__ import annotations

import pytest
import torch

from conftest import REPO, read_metrics

pytestmark = pytest.mark.slow


def test_a_lora_grpo_run_learns_and_its_adapter_loads_in_peft(tmp_path):
    from peft import PeftModel

    from rl_service.config import load_config
    from rl_service.driver import prepare_job, run_training
    from rl_service.models.loading import load_causal_lm

    # Sync mode: the generators' log-probs are then the learner's on the same weights, to the bit.
    config = load_config(REPO / "configs" / "lora.yaml", ["steps=40", "eval_every=20", "schedule.mode=sync",
                                                         "logging.progress_bar=false", "checkpoint.every=20"])
    summary = run_training(prepare_job(config), tmp_path)
    assert summary["steps"] == 40
    # 256 greedy eval prompts: the 46.5% of the shipped model rises (0.4 points of noise a prompt).
    assert summary["final_eval_accuracy"] >= summary["initial_eval_accuracy"] + 0.03, summary
    rows = [row for row in read_metrics(tmp_path) if "loss" in row]
    assert all(row["behaviour_logprob_abs_diff"] < 1e-4 for row in rows)   # engines hold the merged weights
    checkpoint = tmp_path / "checkpoints" / "step_40"
    assert not (checkpoint / "model").exists()   # the adapter only (learner.lora.save_merged: false)
    model = PeftModel.from_pretrained(load_causal_lm("builtin", "float32"), str(checkpoint / "adapter"))
    base = load_causal_lm("builtin", "float32")
    ids = torch.arange(3, 40).unsqueeze(0)
    assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-3)   # it trained
