"""`HRAModel`: the HRA tuner (nn.Linear and nn.Conv2d targets, LoRA's default targets per model type)."""

from __future__ import annotations

from torch import nn

from ...core.dispatch import DispatchChain
from .._shared.tuners import LinearFamilyTuner
from .layer import Conv2d, Linear

DISPATCH = DispatchChain("HRA")
DISPATCH.register(nn.Linear, Linear)
DISPATCH.register(nn.Conv2d, Conv2d)


class HRAModel(LinearFamilyTuner):
    dispatch = DISPATCH
