"""`BOFTModel`: the tuner of the BOFT method (Linear and Conv2d layers)."""

from __future__ import annotations

from torch import nn

from ...core.dispatch import DispatchChain
from ...core.tuner import Tuner
from ..oft.model import fill_default_targets, mark_bias_trainable
from .layer import Conv2d, Linear

DISPATCH = DispatchChain("BOFT")
DISPATCH.register(nn.Linear, Linear)
DISPATCH.register(nn.Conv2d, Conv2d)


class BOFTModel(Tuner):
    dispatch = DISPATCH
    prefix = "boft_"

    def prepare_config(self, config, model):
        return fill_default_targets(config, model, "BOFT")

    def mark_extra_trainable(self, adapter_name, config):
        mark_bias_trainable(self, adapter_name, config.bias)
