"""LoRA initialisation schemes, as a table: `init_lora_weights` value -> function(layer, adapter_name).

The config's accepted values are this table's keys. True and "gaussian" make B @ A zero (identity at init).
"""

from __future__ import annotations

import math
from functools import partial

from torch import nn


def _zero_product(layer, name: str, init_a) -> None:
    """Make B @ A zero at init: B zero and A drawn by `init_a` (embeddings: A zero, B normal, as HF PEFT)."""
    a, b = layer.lora_weights(name)
    if layer.is_embedding:
        nn.init.zeros_(a)
        nn.init.normal_(b)
    else:
        init_a(a, layer.r[name])
        nn.init.zeros_(b)
    bias = layer.lora_B_bias(name)
    if bias is not None:
        nn.init.zeros_(bias)


def _kaiming(a, r: int) -> None:
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's own init


def _gaussian(a, r: int) -> None:
    nn.init.normal_(a, std=1 / r)


def _init_random(layer, name: str) -> None:
    """init_lora_weights=False: keep the random init of both factors (not identity; for tests/debugging)."""


INIT_SCHEMES = {
    True: partial(_zero_product, init_a=_kaiming),
    False: _init_random,
    "gaussian": partial(_zero_product, init_a=_gaussian),
}
