"""`RoadModel`: the RoAd tuner (nn.Linear targets, LoRA's default targets per model type)."""

from __future__ import annotations

from torch import nn

from ...core.dispatch import DispatchChain
from ...core.tuner import Tuner
from ...integrations.transformers_defaults import LORA_TARGETS
from ...quant.merge import AllOrNothingMerge, register_quantised
from .._shared.common import fill_targets, is_nn_linear
from . import bnb
from .layer import Linear

DISPATCH = DispatchChain("RoAd")
DISPATCH.register(nn.Linear, Linear)
register_quantised(DISPATCH, bnb.Linear4bit, bnb.Linear8bitLt)  # bitsandbytes layers first

# as HF PEFT: a copy of LoRA's table
ROAD_TARGETS: dict[str, list[str]] = dict(LORA_TARGETS)


class RoadModel(AllOrNothingMerge, Tuner):
    """Adapts nn.Linear layers and bitsandbytes 4 / 8-bit ones (merges into those requantise, all or
    nothing); 'all-linear' selects nn.Linear layers only (HF PEFT 0.21 has no Conv1D RoAd layer). No bias
    option, as in HF PEFT."""

    dispatch = DISPATCH

    def prepare_config(self, config, model):
        return fill_targets(config, model, ROAD_TARGETS, "RoAd", is_nn_linear)

    def layer_kwargs(self, config, key, module):
        return {"target_name": key}
