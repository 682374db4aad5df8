"""`OFTModel`: the tuner of the OFT method (Linear, Conv2d and Embedding layers)."""

from __future__ import annotations

import logging

from torch import nn

from ...core.dispatch import DispatchChain
from ...core.tuner import Tuner
from ...integrations.transformers_defaults import LORA_TARGETS, default_targets
from .layer import Conv2d, Embedding, Linear

logger = logging.getLogger(__name__)

DISPATCH = DispatchChain("OFT")
DISPATCH.register(nn.Linear, Linear)
DISPATCH.register(nn.Conv2d, Conv2d)
DISPATCH.register(nn.Embedding, Embedding)


def fill_default_targets(config, model: nn.Module, method: str):
    """HF PEFT's OFT / BOFT default target_modules per model type are LoRA's table."""
    if config.target_modules is None:
        config.target_modules = default_targets(LORA_TARGETS, model, method)
    if config.fan_in_fan_out:
        logger.warning("%s supports nn.Linear (not Conv1D) layers: setting fan_in_fan_out=False.", method)
        config.fan_in_fan_out = False
    return config


def mark_bias_trainable(tuner: Tuner, adapter_name: str, bias: str) -> None:
    """bias='all': every base bias trains; '<method>_only': the biases of the layers holding `adapter_name`."""
    if bias == "all":
        for name, param in tuner.model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias" and ".modules_to_save." not in name \
                    and ".original_module." not in name:
                param.requires_grad_(True)
    elif bias.endswith("_only"):
        for layer in tuner.adapter_layers():
            base_bias = getattr(layer.get_base_layer(), "bias", None)
            if adapter_name in layer.adapter_names() and base_bias is not None:
                base_bias.requires_grad_(True)


class OFTModel(Tuner):
    dispatch = DISPATCH
    prefix = "oft_"

    def prepare_config(self, config, model):
        return fill_default_targets(config, model, "OFT")

    def mark_extra_trainable(self, adapter_name, config):
        mark_bias_trainable(self, adapter_name, config.bias)
