"""The base of every config section: unknown keys, inf/NaN, booleans as numbers (and numbers as
booleans) and Ray resource amounts Ray would refuse are errors."""
from __future__ import annotations

from types import UnionType
from typing import Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, field_validator


class _Section(BaseModel):
    # No field takes inf or NaN (`reward.timeout_s: .inf` passed, then overflowed in the run).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_a_number(cls, value, info):
        # pydantic's lax mode reads `steps: true` as 1 and `lr: false` as 0.0, and the other way round
        # `trust_remote_code: 1` as true: a slip, never meant.
        if isinstance(value, (bool, int, float)) and info.field_name in cls.model_fields:
            annotation = cls.model_fields[info.field_name].annotation
            types = get_args(annotation) or (annotation,)
            if isinstance(value, bool) and bool not in types and any(kind in (int, float) for kind in types):
                raise ValueError(f"expected a number, got {str(value).lower()}")
            if not isinstance(value, bool) and bool in types and not any(kind in (int, float) for kind in types):
                raise ValueError(f"expected true or false, got {value}")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _none_is_null(cls, value, info):
        # YAML's null is `null` (or `~`); `keep_last: none` is the string "none", which an optional number,
        # choice or section can never mean otherwise, so it is read as null. A field that takes text
        # keeps it (a column may be named "none"), and so does a choice that lists "none" (learner.offload).
        if not (isinstance(value, str) and value.strip().lower() == "none" and info.field_name in cls.model_fields):
            return value
        annotation = cls.model_fields[info.field_name].annotation
        types = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
        literal_none = any(get_origin(kind) is Literal and "none" in get_args(kind) for kind in types)
        if type(None) in types and str not in types and not literal_none:
            return None
        return value

    @field_validator("num_cpus", "num_gpus", "resources", check_fields=False)
    @classmethod
    def _ray_accepts_the_amount(cls, value, info):
        # What Ray's .options() refuses once the roles start (a traceback after Ray is up, rc 1).
        if isinstance(value, dict):
            for name, amount in value.items():
                if name in ("CPU", "GPU"):
                    raise ValueError(f"{name!r} is not a custom resource: set num_{name.lower()}s beside resources")
                _ray_quantity(amount, f"{name!r}: ")
        elif value is not None:
            _ray_quantity(value)
        return value


RAY_RESOURCE_UNIT = 1e-4   # Ray counts every resource in ten-thousandths


def _ray_quantity(amount: float, prefix: str = "") -> None:
    if amount < 0:
        raise ValueError(f"{prefix}{amount:g} is negative; a resource amount is 0 or more")
    if 0 < amount < RAY_RESOURCE_UNIT:
        raise ValueError(f"{prefix}{amount:g} is finer than Ray's smallest resource amount, {RAY_RESOURCE_UNIT:g}")
