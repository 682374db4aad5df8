"""`FourierFTModel`: the FourierFT tuner (dispatch, per-module n_frequency, default targets, bias training)."""

from __future__ import annotations

import logging
import re

from torch import nn

from ...core import targeting
from ...core.dispatch import DispatchChain
from ...core.layer import AdapterLayer
from ...core.tuner import Tuner
from ...integrations.transformers_defaults import LORA_TARGETS, default_targets
from ..lora.model import is_conv1d, is_linear
from .layer import FourierFTLinear

logger = logging.getLogger(__name__)

# as HF PEFT: LoRA's table, except GPT-2 style models adapt their MLP output projection
FOURIERFT_TARGETS: dict[str, list[str]] = {**LORA_TARGETS, "gpt2": ["mlp.c_proj"], "gpt_bigcode": ["mlp.c_proj"]}

WRAPPER_PARTS = (".modules_to_save.", ".original_module.")

DISPATCH = DispatchChain("FourierFT")
DISPATCH.register(is_linear, FourierFTLinear)


def n_frequency_for(config, key: str) -> int:
    """HF PEFT's lookup: the first pattern matching `key` as a dotted suffix, then `key` itself, else the default."""
    patterns = config.n_frequency_pattern or {}
    chosen = next((p for p in patterns if re.match(rf".*\.{p}$", key)), key)
    return patterns.get(chosen, config.n_frequency)


def align_fan_in_fan_out(config, module: nn.Module, method: str) -> None:
    """As HF PEFT: the config's fan_in_fan_out follows the layer type of each new target (with a warning)."""
    wanted = is_conv1d(module)
    if bool(config.fan_in_fan_out) != wanted:
        logger.warning("%s: fan_in_fan_out=%s does not fit %s; setting it to %s.", method, config.fan_in_fan_out,
                       type(module).__name__, wanted)
        config.fan_in_fan_out = wanted


def mark_bias_trainable(tuner: Tuner, adapter_name: str, bias: str) -> None:
    """bias='all': every bias of the model trains; '<method>_only': the biases of the adapted layers."""
    if bias == "all":
        for name, param in tuner.model.named_parameters():  # modules_to_save wrappers manage their own copies
            if name.rsplit(".", 1)[-1] == "bias" and not any(w in name for w in WRAPPER_PARTS):
                param.requires_grad_(True)
    elif bias.endswith("_only"):
        for layer in tuner.adapter_layers():
            base_bias = getattr(layer.get_base_layer(), "bias", None)
            if adapter_name in layer.adapter_names() and base_bias is not None:
                base_bias.requires_grad_(True)


class FourierFTModel(Tuner):
    dispatch = DISPATCH
    prefix = "fourierft_"

    def prepare_config(self, config, model):
        if config.target_modules is None:
            config.target_modules = default_targets(FOURIERFT_TARGETS, model, "FourierFT")
        elif isinstance(config.target_modules, str) and config.target_modules.lower() == targeting.ALL_LINEAR:
            config.target_modules = targeting.all_linear_targets(model, config.task_type, is_linear)
        return config

    def layer_kwargs(self, config, key: str, module: nn.Module) -> dict:
        if not isinstance(module, AdapterLayer):
            align_fan_in_fan_out(config, module, "FourierFT")
        return {"n_frequency": n_frequency_for(config, key)}

    def mark_extra_trainable(self, adapter_name, config):
        mark_bias_trainable(self, adapter_name, config.bias)
