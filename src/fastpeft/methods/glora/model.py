"""`GloraModel`: the GLoRA tuner (plain nn.Linear targets, LoRA's default targets per model type, the `bias`
option)."""

from __future__ import annotations

from torch import nn

from ...core.dispatch import DispatchChain
from .._shared.tuners import LinearFamilyTuner
from .layer import GloraLinear


def plain_linear(module: nn.Module) -> bool:
    """nn.Linear itself, not a subclass (HF PEFT refuses those for GLoRA)."""
    return type(module) is nn.Linear


DISPATCH = DispatchChain("GLoRA")
DISPATCH.register(plain_linear, GloraLinear)


class GloraModel(LinearFamilyTuner):
    dispatch = DISPATCH
