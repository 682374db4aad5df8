"""HF PEFT's module path `peft.tuners.mixed.model` (re-exports; the code is in fastpeft.mixing)."""

from ... import methods as _methods  # noqa: F401  (every method registered: the mixable ones are known)
from ...mixing.tuner import MixedModel, compatible_types

# the methods whose MethodSpec declares them mixable
COMPATIBLE_TUNER_TYPES = compatible_types()

__all__ = ["COMPATIBLE_TUNER_TYPES", "MixedModel"]
