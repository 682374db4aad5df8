"""`OFTModel`: the tuner of the OFT method (Linear, Conv2d and Embedding layers)."""

from __future__ import annotations

from torch import nn

from ...core.dispatch import DispatchChain
from .._shared.tuners import OrthogonalTuner
from .layer import Conv2d, Embedding, Linear, OFTLayer

DISPATCH = DispatchChain("OFT")
DISPATCH.register(nn.Linear, Linear)
DISPATCH.register(nn.Conv2d, Conv2d)
DISPATCH.register(nn.Embedding, Embedding)


class OFTModel(OrthogonalTuner):
    dispatch = DISPATCH
    layer_family = OFTLayer
