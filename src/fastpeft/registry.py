"""The method registry: one `MethodSpec` per adapter method, keyed by `PeftType`.

Everything generic (config loading, model building, checkpoint keys) looks methods up here instead of
branching on method names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .types import PeftType


@dataclass(frozen=True)
class MethodSpec:
    """What the generic code needs to know about one method.

    `prefix`: the start of every adapter parameter name of the method (e.g. "lora_"), used to tell adapter
    keys in HF-PEFT checkpoints; `tuner_cls`: the `Tuner` subclass that injects the method's layers.
    """

    peft_type: PeftType
    config_cls: type
    prefix: str
    tuner_cls: type | None = None
    prompt_cls: type | None = None
    extra: dict[str, Any] | None = None


_REGISTRY: dict[PeftType, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.peft_type in _REGISTRY and _REGISTRY[spec.peft_type] != spec:
        raise ValueError(f"Method {spec.peft_type.value} is registered twice.")
    _REGISTRY[spec.peft_type] = spec
    spec.config_cls.PEFT_TYPE = spec.peft_type.value
    return spec


def get_spec(peft_type: str | PeftType) -> MethodSpec:
    try:
        return _REGISTRY[PeftType(peft_type)]
    except (KeyError, ValueError):
        known = ", ".join(sorted(p.value for p in _REGISTRY))
        raise ValueError(
            f"peft_type {getattr(peft_type, 'value', peft_type)!r} is not supported by fastpeft yet "
            f"(supported: {known})."
        ) from None


def registered() -> dict[PeftType, MethodSpec]:
    return dict(_REGISTRY)
