"""`OFTModel`: the tuner of the OFT method (Linear, Conv2d and Embedding layers)."""

from __future__ import annotations

import logging

from torch import nn

from ...core.dispatch import DispatchChain
from ...core.tuner import Tuner
from ...integrations.transformers_defaults import LORA_TARGETS
from ..common import fill_targets, train_base_biases
from .layer import Conv2d, Embedding, Linear

logger = logging.getLogger(__name__)

DISPATCH = DispatchChain("OFT")
DISPATCH.register(nn.Linear, Linear)
DISPATCH.register(nn.Conv2d, Conv2d)
DISPATCH.register(nn.Embedding, Embedding)


class OrthogonalTuner(Tuner):
    """What OFT and BOFT tuners share: LoRA's default targets, nn.Linear weights (no Conv1D) and the `bias` option;
    a subclass gives its `dispatch` (whose method name labels messages) and `prefix`."""

    def prepare_config(self, config, model):
        method = self.dispatch.method
        fill_targets(config, model, LORA_TARGETS, method)  # HF PEFT's OFT / BOFT defaults are LoRA's table
        if config.fan_in_fan_out:
            logger.warning("%s supports nn.Linear (not Conv1D) layers: setting fan_in_fan_out=False.", method)
            config.fan_in_fan_out = False
        return config

    def mark_extra_trainable(self, adapter_name, config):
        train_base_biases(self, adapter_name, config.bias)


class OFTModel(OrthogonalTuner):
    dispatch = DISPATCH
    prefix = "oft_"
