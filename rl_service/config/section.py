"""The base of every config section: unknown keys, inf/NaN and booleans-as-numbers are errors."""
from __future__ import annotations

from typing import get_args

from pydantic import BaseModel, ConfigDict, field_validator


class _Section(BaseModel):
    # No field takes inf or NaN (`reward.timeout_s: .inf` passed, then overflowed in the run).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_a_number(cls, value, info):
        # pydantic's lax mode reads `steps: true` as 1 and `lr: false` as 0.0: a slip, never meant.
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            annotation = cls.model_fields[info.field_name].annotation
            types = get_args(annotation) or (annotation,)
            if bool not in types and any(kind in (int, float) for kind in types):
                raise ValueError(f"expected a number, got {str(value).lower()}")
        return value
