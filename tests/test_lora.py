"""LoRA on the learner (`learner.lora`, rl_service/training/lora.py): only the adapters train, what the
generators get is W + (alpha / r) B A under the base's names (checked in float64 against the adapter
file peft writes), the adapter loads in peft, the KL reference is the untouched base, resume
continues bit for bit, and bad settings are refused by name."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rl_service.config import load_config
from rl_service.data.arithmetic import make_arithmetic_split
from rl_service.data.prompts import PromptRecord
from rl_service.models.loading import load_causal_lm
from rl_service.rollout import GenerationRequest, SamplingParams
from rl_service.tasks import PromptTokenizer

LORA = ["learner.lora.rank=4", "learner.lora.alpha=12", "learner.lr=5e-3", "learner.micro_batch_size=8"]


@pytest.fixture(scope="module")
def rollout():
    from rl_service.generation.hf_engine import HFGenerationEngine

    engine = HFGenerationEngine("builtin")
    train, _ = make_arithmetic_split(seed=3, num_train=4, num_eval=1, levels=[1, 2])
    tokenize = PromptTokenizer(engine.tokenizer, thinking=True)
    requests = [GenerationRequest(k, p.prompt_id, tokenize(PromptRecord(p.prompt_id, p.question, p.answer)), 4)
                for k, p in enumerate(train)]
    return engine.generate(requests, SamplingParams(max_new_tokens=24), seed=1)


def _rewards(rollout, step: int) -> list[float]:
    return [float((k + step) % 3 == 0) for k in range(len(rollout))]


def _learner(overrides=(), resume_from=None):
    from rl_service.training.policy_learner import PolicyLearner

    return PolicyLearner(load_config(None, [*LORA, *overrides]), resume_from)


@pytest.fixture(scope="module")
def trained(rollout):
    learner = _learner(["algorithm.kl_coef=0.05", "learner.zero_stage=1"])
    metrics = [learner.train_step(rollout, _rewards(rollout, step)) for step in (1, 2, 3)]
    return learner, metrics


def test_only_the_adapters_train_and_the_reference_is_the_base(trained, rollout):
    learner, metrics = trained
    base = dict(load_causal_lm("builtin", "float32").named_parameters())
    trainable = {name for name, p in learner.engine.module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    for name, parameter in learner.engine.module.get_base_model().named_parameters():
        if ".lora_" not in name:   # the frozen base is the shipped model, bit for bit, after 3 updates
            assert torch.equal(parameter, base[name.replace(".base_layer.", ".")]), name
    # B starts at 0: step 1's policy is the base, so its KL to the reference is 0; later steps move away.
    assert metrics[0]["kl_k3_mean"] == pytest.approx(0.0, abs=1e-6) and metrics[2]["kl_k3_mean"] > 0
    ids = torch.tensor([rollout.prompt_token_ids[0] + rollout.completion_token_ids[0]])
    reference = learner.reference_model(input_ids=ids).logits
    assert torch.equal(reference, load_causal_lm("builtin", "float32")(input_ids=ids).logits)
    assert not torch.allclose(reference, learner.engine.module(input_ids=ids).logits)


def test_published_and_saved_weights_are_base_plus_scaled_lora_product(trained, tmp_path):
    learner, _ = trained
    learner.save_pretrained(tmp_path)
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    scaling = adapter_config["lora_alpha"] / adapter_config["r"]
    assert scaling == 3.0
    base = {name: p.detach().double() for name, p in load_causal_lm("builtin", "float32").named_parameters()}
    published = dict(learner.flat_weights(version=3).tensors())
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert set(published) == set(base)   # the base's own names: engines load it as a full model
    merged_layers = 0
    for name, expected in base.items():
        stem = name.removesuffix(".weight")
        a_key = f"base_model.model.{stem}.lora_A.weight"
        if a_key in adapter:   # W + (alpha / r) B A, in float64 from peft's file
            expected = expected + scaling * adapter[f"base_model.model.{stem}.lora_B.weight"].double() @ adapter[a_key].double()
            merged_layers += 1
        assert torch.allclose(published[name].double(), expected, atol=1e-6, rtol=0), name
        assert torch.allclose(saved[name].double(), expected, atol=1e-6, rtol=0), name
    assert merged_layers == 4 * 7   # every linear layer of the 4 blocks (q k v o gate up down), not the head


def test_the_adapter_loads_in_peft_and_the_merged_model_in_transformers(trained, rollout, tmp_path):
    from peft import PeftModel

    learner, _ = trained
    learner.save_pretrained(tmp_path)
    ids = torch.tensor([rollout.prompt_token_ids[1] + rollout.completion_token_ids[1]])
    ours = learner.engine.module(input_ids=ids).logits
    in_peft = PeftModel.from_pretrained(load_causal_lm("builtin", "float32"), str(tmp_path / "adapter"))
    assert torch.allclose(in_peft(input_ids=ids).logits, ours, atol=1e-6, rtol=0)
    merged = load_causal_lm(str(tmp_path), "float32")   # a plain HF model directory: no peft needed
    assert torch.allclose(merged(input_ids=ids).logits, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("stage", [0, 2])
def test_a_lora_learner_resumes_bit_for_bit_from_its_adapter(rollout, tmp_path, stage):
    original = _learner([f"learner.zero_stage={stage}", "learner.warmup_steps=3"])
    for step in (1, 2):
        original.train_step(rollout, _rewards(rollout, step))
    original.save_checkpoint(tmp_path)
    # The adapter and the optimizer state over the adapters only; no merged copy unless asked for.
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file() and not (tmp_path / "model").exists()
    restored = _learner([f"learner.zero_stage={stage}", "learner.warmup_steps=3"], resume_from=tmp_path)
    expected = original.train_step(rollout, _rewards(rollout, 3))
    got = restored.train_step(rollout, _rewards(rollout, 3))
    assert got["loss"] == expected["loss"] and got["learning_rate"] == expected["learning_rate"]
    want = dict(original.engine.module.named_parameters())
    for name, value in restored.engine.module.named_parameters():
        assert torch.equal(value, want[name]), name


def test_a_pickle_adapter_is_not_loaded(trained, tmp_path):
    # peft falls back to adapter_model.bin (a pickle) where no safetensors file is there.
    from rl_service.training.lora import with_adapters

    trained[0].save_checkpoint(tmp_path)
    adapter = tmp_path / "adapter"
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter / "adapter_model.bin")
    with pytest.raises(ValueError, match="no adapter_model.safetensors .pickle adapters, adapter_model.bin, are not loaded"):
        with_adapters(load_causal_lm("builtin", "float32"), load_config(None, LORA).learner.lora, adapter)


def test_save_merged_adds_the_merged_model_to_checkpoints(rollout, tmp_path):
    learner = _learner(["learner.lora.save_merged=true"])
    learner.train_step(rollout, _rewards(rollout, 1))
    learner.save_checkpoint(tmp_path)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "model" / "model.safetensors").is_file() and (tmp_path / "model" / "tokenizer.json").is_file()


def test_bad_lora_settings_are_refused_by_name():
    from rl_service.errors import ConfigError

    with pytest.raises(ConfigError, match="learner.lora applies to learner.zero_stage 0-2"):
        load_config(None, ["learner.lora.rank=8", "learner.zero_stage=3"])
    with pytest.raises(ConfigError, match="learner.lora.target_modules"):
        load_config(None, ["learner.lora.target_modules=[]"])
    with pytest.raises(ConfigError, match="learner.lora.rank"):
        load_config(None, ["learner.lora.rank=0"])


def test_an_unknown_target_module_is_refused_before_ray_starts():
    from rl_service.errors import UserError
    from rl_service.models.loading import check_weights_match_config
    from rl_service.training.lora import check_targets

    config = load_config(None, ["learner.lora.target_modules=[q_proj,qkv]"])
    with pytest.raises(UserError, match=r"learner.lora.target_modules: no linear layer named 'qkv'.*q_proj"):
        check_targets(check_weights_match_config("builtin"), config.learner.lora)
    check_targets(check_weights_match_config("builtin"), load_config(None, ["learner.lora.target_modules=[q_proj,v_proj]"]).learner.lora)


def test_a_model_path_naming_an_adapter_says_what_it_is(trained, tmp_path):
    from rl_service.errors import ModelLoadError
    from rl_service.models.loading import resolve_model_dir

    learner, _ = trained
    learner.save_checkpoint(tmp_path)
    with pytest.raises(ModelLoadError, match="model.path: .*/adapter is a LoRA adapter, not a model"):
        resolve_model_dir(tmp_path / "adapter")
