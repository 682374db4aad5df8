"""`BOFTModel`: the tuner of the BOFT method (Linear and Conv2d layers)."""

from __future__ import annotations

from torch import nn

from ...core.dispatch import DispatchChain
from ..oft.model import OrthogonalTuner
from .layer import Conv2d, Linear

DISPATCH = DispatchChain("BOFT")
DISPATCH.register(nn.Linear, Linear)
DISPATCH.register(nn.Conv2d, Conv2d)


class BOFTModel(OrthogonalTuner):
    dispatch = DISPATCH
    prefix = "boft_"
