"""LoRA on the learner (`learner.lora`; Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models"), with `peft`: the base's weights stay frozen, each targeted linear layer W gets trainable
A [r, in] and B [out, r] (B starts at 0, so step 0 is the base model), and the layer computes
W x + (alpha / r) · B A x.

- The generators never see adapters: every publication and the final model carry the merged
  weights W + (alpha / r) · B A under the base model's own parameter names, so HF, torch and vLLM
  engines load them exactly like a full-weight run's (`merged_named_weights`).
- The KL reference is the base itself, the adapters switched off (`AdaptersOff`): no second copy
  of the weights.
- A checkpoint saves the adapter as peft writes it (`adapter/`: adapter_config.json +
  adapter_model.safetensors, loadable by `PeftModel.from_pretrained`); resume rebuilds the base from
  `model.path` and loads the adapter back, trainable.
No Ray here.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Iterator

import torch

from rl_service.config.lora import LoraConfig
from rl_service.errors import UserError

ADAPTER_DIR = "adapter"
ADAPTER_NAME = "default"   # peft's name for a model's one adapter


def peft_config(lora: LoraConfig):
    import peft

    return peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                           target_modules=lora.target_modules, bias="none", task_type="CAUSAL_LM")


def with_adapters(model: torch.nn.Module, lora: LoraConfig, adapter_from: str | Path | None = None):
    """`model` (the base, loaded) wrapped with fresh adapters (initialised from torch's RNG: seeded
    by the caller), or with the trainable adapter saved in `adapter_from`."""
    import peft

    if adapter_from is not None:
        # peft falls back to adapter_model.bin, a pickle (torch's restricted unpickler is all that
        # stands between it and code): an adapter is read from safetensors only, as every weight is.
        if not (Path(adapter_from) / "adapter_model.safetensors").is_file():
            raise ValueError(f"{adapter_from}: no adapter_model.safetensors (pickle adapters, adapter_model.bin, are "
                             "not loaded)")
        return peft.PeftModel.from_pretrained(model, str(adapter_from), is_trainable=True)
    return peft.get_peft_model(model, peft_config(lora))


def with_saved_adapter_merged(base: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """`base` with a checkpoint's adapter/ merged in (W + (alpha / r) · B A), a plain model again: what
    the run's generators served, for `rl-service eval` of a LoRA checkpoint saved without model/."""
    with torch.no_grad():
        return with_adapters(base, lora=None, adapter_from=adapter_dir).merge_and_unload()


def is_lora(model: torch.nn.Module) -> bool:
    import peft

    return isinstance(model, peft.PeftModel)


def published_sources(model) -> Iterator[tuple[str, torch.Tensor, Callable[[], torch.Tensor]]]:
    """For every weight of the base model, under its own name (`model.layers.0.self_attn.q_proj.weight`):
    (name, the frozen base tensor, which has the published shape and dtype, a function that makes the
    published tensor). A targeted layer's is W + (alpha / r) · B A (peft's `get_delta_weight`), made
    only when called, so a publisher merges one bucket at a time and a layout needs no merge at all."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    adapted = {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    for name, parameter in base.named_parameters():
        if ".lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".base_layer.")
        weight = parameter.detach()
        if owner in adapted and leaf == "weight":
            yield f"{owner}.weight", weight, functools.partial(_merged, adapted[owner], weight)
        else:
            yield (f"{owner}.{leaf}" if owner in adapted else name), weight, functools.partial(unchanged, weight)


def merged_named_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of what a full-weight model with these adapters merged in holds. New tensors
    for the merged layers; the rest are the frozen parameters themselves."""
    for name, _, make in published_sources(model):
        yield name, make()


def unchanged(tensor: torch.Tensor) -> torch.Tensor:
    """A published source that is the tensor itself (a picklable partial, unlike a lambda)."""
    return tensor


@torch.no_grad()
def _merged(layer, weight: torch.Tensor) -> torch.Tensor:
    """W + (alpha / r) · B A of one adapted layer. A plain linear adapter in one fused addmm (one new
    tensor, 2.4x faster than peft's delta-then-add on CPU); anything else (DoRA, fan_in_fan_out,
    convolutions) through peft's own `get_delta_weight`."""
    if ADAPTER_NAME not in layer.lora_A:
        return weight.detach()
    a, b = layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]
    plain = (isinstance(a, torch.nn.Linear) and not getattr(layer, "fan_in_fan_out", False)
             and not layer.use_dora.get(ADAPTER_NAME, False) and a.weight.dtype == weight.dtype)
    if plain:
        return torch.addmm(weight, b.weight, a.weight, alpha=layer.scaling[ADAPTER_NAME])
    return (weight + layer.get_delta_weight(ADAPTER_NAME)).to(weight.dtype)


def save_adapter(model, directory: str | Path) -> None:
    model.save_pretrained(str(directory), safe_serialization=True)


def save_merged(model, tokenizer, directory: str | Path) -> None:
    """A plain HF model directory of the merged weights (no peft needed to load it)."""
    base = model.get_base_model()
    merged = dict(merged_named_weights(model))
    state = {}
    for name, tensor in base.state_dict().items():   # buffers and tied heads too, as HF saves them
        if ".lora_" not in name:
            key = name.replace(".base_layer.", ".")
            state[key] = merged.get(key, tensor)
    base.save_pretrained(str(directory), state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(str(directory))


class AdaptersOff:
    """The frozen base as a model: `model(...)` with the adapters switched off (the KL reference
    and π_ref of DPO/BVPO under LoRA). No gradient flows: the reference is a constant."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **inputs):
        with torch.no_grad(), self.model.disable_adapter():
            return self.model(**inputs)


def check_targets(model: torch.nn.Module, lora: LoraConfig) -> None:
    """Before Ray starts: every name in `target_modules` matches a linear layer of `model` (built on
    the meta device), as peft matches them (the module's name, or its last dotted parts)."""
    if lora.target_modules == "all-linear":
        return
    linear = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    for target in lora.target_modules:
        if not any(name == target or name.endswith("." + target) for name in linear):
            known = sorted({name.rsplit(".", 1)[-1] for name in linear})
            raise UserError(f"learner.lora.target_modules: no linear layer named {target!r} in the model "
                            f"(its linear layers: {', '.join(known)})")
