"""`C3AModel`: the C3A tuner (nn.Linear targets, per-module block_size, default targets per model type)."""

from __future__ import annotations

from torch import nn

from ...core.dispatch import DispatchChain
from ...integrations.transformers_defaults import LORA_TARGETS
from .._shared.common import fill_targets, is_nn_linear, pattern_value
from .._shared.tuners import LinearFamilyTuner
from .layer import C3ALinear

DISPATCH = DispatchChain("C3A")
DISPATCH.register(nn.Linear, C3ALinear)

# as HF PEFT: LoRA's table, except GPT-2 style models name their MLP output projection
C3A_TARGETS: dict[str, list[str]] = {**LORA_TARGETS, "gpt2": ["mlp.c_proj"], "gpt_bigcode": ["mlp.c_proj"]}


def block_size_for(config, key: str) -> int:
    """HF PEFT's lookup: the first pattern matching `key` as a dotted suffix, else `key` itself as an entry,
    else config.block_size."""
    return pattern_value(config.block_size_pattern, key, config.block_size)


class C3AModel(LinearFamilyTuner):
    dispatch = DISPATCH

    def prepare_config(self, config, model):
        return fill_targets(config, model, C3A_TARGETS, "C3A", is_nn_linear)

    def layer_kwargs(self, config, key, module):
        return {"target_name": key, "block_size": block_size_for(config, key)}
