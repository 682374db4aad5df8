"""LoRA initialisation schemes, as a table: `init_lora_weights` value -> function(layer, adapter_name).

The config's accepted values are this table's keys. True and "gaussian" make B @ A zero (identity at init).
"""

from __future__ import annotations

import math

from torch import nn


def _init_default(layer, name: str) -> None:
    a, b = layer.lora_weights(name)
    if layer.is_embedding:
        # embedding LoRA: A (r, vocab) zero, B (dim, r) normal, as HF PEFT
        nn.init.zeros_(a)
        nn.init.normal_(b)
    else:
        # A as nn.Linear's own init (kaiming-uniform, a=sqrt(5)); B zero so the product starts at zero
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)
    _zero_lora_bias(layer, name)


def _init_gaussian(layer, name: str) -> None:
    a, b = layer.lora_weights(name)
    if layer.is_embedding:
        nn.init.zeros_(a)
        nn.init.normal_(b)
    else:
        nn.init.normal_(a, std=1 / layer.r[name])
        nn.init.zeros_(b)
    _zero_lora_bias(layer, name)


def _init_random(layer, name: str) -> None:
    """init_lora_weights=False: keep the random init of both factors (not identity; for tests/debugging)."""


def _zero_lora_bias(layer, name: str) -> None:
    bias = layer.lora_B_bias(name)
    if bias is not None:
        nn.init.zeros_(bias)


INIT_SCHEMES = {True: _init_default, False: _init_random, "gaussian": _init_gaussian}
