"""HF PEFT's module path `peft.tuners.mixed` (re-exports; the code is in fastpeft.mixing)."""

from .model import COMPATIBLE_TUNER_TYPES, MixedModel

__all__ = ["COMPATIBLE_TUNER_TYPES", "MixedModel"]
