"""`HiraModel`: the HiRA tuner (nn.Linear, Conv1D, nn.Embedding and nn.Conv1d/2d/3d targets, LoRA's default
targets per model type, the rank_pattern rule of HF PEFT 0.21)."""

from __future__ import annotations

import logging

from torch import nn

from ...core.dispatch import DispatchChain
from ...core.layer import AdapterLayer
from ...core.targeting import pattern_value
from ...core.tuner import Tuner
from ...integrations.transformers_defaults import LORA_TARGETS
from ...quant.merge import AllOrNothingMerge, register_quantised
from .._shared.common import fill_targets
from .._shared.modules import is_conv1d, is_linear
from . import bnb
from .layer import Conv1d, Conv2d, Conv3d, Embedding, Linear

logger = logging.getLogger(__name__)

# HF PEFT reuses LoRA's default targets for HiRA
HIRA_TARGETS = LORA_TARGETS

DISPATCH = DispatchChain("HiRA")
DISPATCH.register(is_linear, Linear)
DISPATCH.register(nn.Embedding, Embedding)
DISPATCH.register(nn.Conv1d, Conv1d)
DISPATCH.register(nn.Conv2d, Conv2d)
DISPATCH.register(nn.Conv3d, Conv3d)
register_quantised(DISPATCH, bnb.Linear4bit, bnb.Linear8bitLt)  # bitsandbytes layers first


class HiraModel(AllOrNothingMerge, Tuner):
    """As HF PEFT: LoRA's default targets per model type, 'all-linear' over nn.Linear and Conv1D layers, the
    weight layout taken from the layer type (a fan_in_fan_out that does not fit is warned about); bitsandbytes
    4 / 8-bit layers too (merges into those requantise, all or nothing)."""

    dispatch = DISPATCH

    def prepare_config(self, config, model):
        return fill_targets(config, model, HIRA_TARGETS, "HiRA", is_linear)

    def layer_kwargs(self, config, key: str, module: nn.Module) -> dict:
        pattern_r = pattern_value(config.rank_pattern, key, config.r)
        if isinstance(module, AdapterLayer):
            return {"target_name": key, "r": pattern_r}
        # HF PEFT 0.21 builds every new HiRA layer with config.r (its rank_pattern reaches only adapters added
        # to layers already wrapped): the same here, so that files keep their shapes between the libraries
        if pattern_r != config.r:
            logger.warning("HiRA: rank_pattern gives r=%s for '%s', but a newly wrapped layer gets r=%s as "
                           "in HF PEFT 0.21 (rank_pattern applies to adapters added to HiRA layers).",
                           pattern_r, key, config.r)
        if is_linear(module) and bool(config.fan_in_fan_out) != is_conv1d(module):
            logger.warning("HiRA: fan_in_fan_out=%s does not fit '%s' (%s); using %s for it.",
                           config.fan_in_fan_out, key, type(module).__name__, is_conv1d(module))
        return {"target_name": key, "r": config.r}
