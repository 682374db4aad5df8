"""Helpers shared by the init schemes: the default init, and the checks and writes of those that decompose the
base weight (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..._shared.modules import is_conv1d

HALF_OR_FULL = (torch.float32, torch.float16, torch.bfloat16)


def zero_product(layer, name: str, init_a) -> None:
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


def kaiming(a, r: int) -> None:
    """init_lora_weights=True's A: nn.Linear's own init."""
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))


def base_weight(layer, scheme: str) -> torch.Tensor:
    """The 2-D weight of a linear (or Conv1D) base layer; other layer kinds are refused before any change."""
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    # MHA's out_proj is a NonDynamicallyQuantizableLinear whose LoRA delta MHA applies twice (layer.py)
    inside_mha = isinstance(base, nn.modules.linear.NonDynamicallyQuantizableLinear)
    if layer.is_embedding or not isinstance(weight, torch.Tensor) or weight.dim() != 2 or inside_mha:
        raise ValueError(
            f"init_lora_weights={scheme!r} works on linear layers (nn.Linear, transformers' Conv1D) only, "
            f"not on {type(base).__name__}. Leave such layers out (exclude_modules) or give them a separate "
            "adapter with init_lora_weights=True."
        )
    return weight


def is_transposed(layer) -> bool:
    """Whether the base weight is stored (in, out) like GPT-2's Conv1D (fan_in_fan_out)."""
    return bool(layer.fan_in_fan_out) or is_conv1d(layer.get_base_layer())


def check_decomposable(layer, name: str, weight: torch.Tensor, scheme: str) -> None:
    if weight.dtype not in HALF_OR_FULL:
        raise TypeError(
            f"init_lora_weights={scheme!r} needs a float32, float16 or bfloat16 base weight, got "
            f"{weight.dtype}. Initialise on the unquantised model, then quantise the residual model."
        )
    r, limit = layer.r[name], min(weight.shape)
    if r > limit:
        raise ValueError(
            f"init_lora_weights={scheme!r} needs r <= min(in_features, out_features) = {limit} for a layer "
            f"with weight shape {tuple(weight.shape)}, got r={r}; lower r (rank_pattern can set it for this "
            "layer)."
        )


def set_factors(layer, name: str, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    """Factors stored in the base weight's dtype first (as HF PEFT; autocast may widen them again later)."""
    weight_a, weight_b = layer.lora_weights(name)
    weight_a.data, weight_b.data = a.contiguous().to(dtype), b.contiguous().to(dtype)
