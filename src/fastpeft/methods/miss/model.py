"""`MissModel`: the MiSS tuner (nn.Linear targets, LoRA's default targets per model type)."""

from __future__ import annotations

from torch import nn

from ...core.dispatch import DispatchChain
from ...core.tuner import Tuner
from ..hra.model import BiasOptionMixin, prepare_linear_targets
from .layer import Linear

DISPATCH = DispatchChain("MiSS")
DISPATCH.register(nn.Linear, Linear)


class MissModel(BiasOptionMixin, Tuner):
    dispatch = DISPATCH
    prefix = "miss_"

    def prepare_config(self, config, model):
        return prepare_linear_targets(config, model, "MiSS")

    def layer_kwargs(self, config, key, module):
        return {"target_name": key}
