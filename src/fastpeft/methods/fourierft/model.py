"""`FourierFTModel`: the FourierFT tuner (dispatch, per-module n_frequency, default targets, bias
training)."""

from __future__ import annotations

from torch import nn

from ...core.dispatch import DispatchChain
from ...core.layer import AdapterLayer
from ...core.tuner import Tuner
from ...integrations.transformers_defaults import LORA_TARGETS
from .._shared.common import (
    align_fan_in_fan_out,
    bias_file_keys,
    fill_targets,
    pattern_value,
    train_base_biases,
)
from .._shared.modules import is_linear
from .layer import FourierFTLinear

# as HF PEFT: LoRA's table, except GPT-2 style models adapt their MLP output projection
FOURIERFT_TARGETS: dict[str, list[str]] = {**LORA_TARGETS, "gpt2": ["mlp.c_proj"],
                                           "gpt_bigcode": ["mlp.c_proj"]}

DISPATCH = DispatchChain("FourierFT")
DISPATCH.register(is_linear, FourierFTLinear)


def n_frequency_for(config, key: str) -> int:
    """HF PEFT's lookup: the first pattern matching `key` as a dotted suffix, then `key` itself, else the
    default."""
    return pattern_value(config.n_frequency_pattern, key, config.n_frequency)


class FourierFTModel(Tuner):
    dispatch = DISPATCH

    def prepare_config(self, config, model):
        return fill_targets(config, model, FOURIERFT_TARGETS, "FourierFT", is_linear)

    def layer_kwargs(self, config, key: str, module: nn.Module) -> dict:
        if not isinstance(module, AdapterLayer):
            align_fan_in_fan_out(config, module, key)
        return {"n_frequency": n_frequency_for(config, key)}

    base_file_keys = staticmethod(bias_file_keys)  # the biases `bias` trains are saved with the adapter

    def mark_extra_trainable(self, adapter_name, config):
        train_base_biases(self, adapter_name, config.bias)
