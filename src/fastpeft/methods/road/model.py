"""`RoadModel`: the RoAd tuner (nn.Linear targets, LoRA's default targets per model type)."""

from __future__ import annotations

from torch import nn

from ...core.dispatch import DispatchChain
from ...core.tuner import Tuner
from ...integrations.transformers_defaults import LORA_TARGETS
from .._shared.common import fill_targets, is_nn_linear
from .layer import Linear

DISPATCH = DispatchChain("RoAd")
DISPATCH.register(nn.Linear, Linear)

# as HF PEFT: a copy of LoRA's table
ROAD_TARGETS: dict[str, list[str]] = dict(LORA_TARGETS)


class RoadModel(Tuner):
    """Adapts nn.Linear layers; 'all-linear' selects nn.Linear layers only (HF PEFT 0.21 has no Conv1D
    RoAd layer). No bias option, as in HF PEFT."""

    dispatch = DISPATCH

    def prepare_config(self, config, model):
        return fill_targets(config, model, ROAD_TARGETS, "RoAd", is_nn_linear)

    def layer_kwargs(self, config, key, module):
        return {"target_name": key}
