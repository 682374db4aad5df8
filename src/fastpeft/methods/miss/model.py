"""`MissModel`: the MiSS tuner (nn.Linear targets, LoRA's default targets per model type)."""

from __future__ import annotations

from torch import nn

from ...core.dispatch import DispatchChain
from .._shared.tuners import LinearFamilyTuner
from .layer import Linear

DISPATCH = DispatchChain("MiSS")
DISPATCH.register(nn.Linear, Linear)


class MissModel(LinearFamilyTuner):
    dispatch = DISPATCH
