"""`learner.lora`: train low-rank adapters on a frozen base (Hu et al. 2021, "LoRA"), with `peft`."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from rl_service.config.section import _Section


class LoraConfig(_Section):
    rank: int = Field(8, ge=1, le=4096, description="r: the adapters' inner dimension")
    alpha: float = Field(16.0, gt=0.0, le=1e6, description="the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapters' input while training")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="modules that get adapters: 'all-linear' (every linear layer but the output head) "
                                  "or module names matched as peft does (q_proj, v_proj, ...)")
    save_merged: bool = Field(
        False, description="checkpoints also hold the merged model (model/); the adapter (adapter/, loadable by "
                           "peft) is always saved (the final checkpoint too: without this it has no model/)")

    @field_validator("target_modules")
    @classmethod
    def _named(cls, value):
        if isinstance(value, list) and (not value or any(not name.strip() for name in value)):
            raise ValueError("a non-empty list of module names, or 'all-linear'")
        return value
