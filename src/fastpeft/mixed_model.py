"""HF PEFT's module path `peft.mixed_model` (transformers imports `PeftMixedModel` from it for its isinstance
checks); the code is in fastpeft.mixing."""

from .mixing.model import PeftMixedModel

__all__ = ["PeftMixedModel"]
