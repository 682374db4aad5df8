"""Adapters of several methods in one model: `PeftMixedModel` (model.py) over the `MixedModel` tuner
(tuner.py)."""

from .model import PeftMixedModel
from .tuner import MixedModel, compatible_types

__all__ = ["MixedModel", "PeftMixedModel", "compatible_types"]
