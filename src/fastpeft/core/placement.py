"""Where new and loaded adapter weights go: the device and dtype of the base layer they adapt.

A layer's reference tensor is its `placement_reference` when it declares one (a 4-bit layer's compute dtype,
quant/bnb.py), else the first parameter of its base layer.
"""

from __future__ import annotations

import torch
from torch import nn

_HALF = (torch.float16, torch.bfloat16)


def placement_reference(layer: nn.Module) -> torch.Tensor | None:
    ref = getattr(layer, "placement_reference", None)
    return next((p for p in layer.get_base_layer().parameters()), None) if ref is None else ref


def place_new(layer: nn.Module, adapter_name: str, autocast: bool) -> None:
    """New adapter weights onto the base layer's device; fp16/bf16 bases get fp32 adapters if `autocast`."""
    ref = placement_reference(layer)
    if ref is None:
        return
    widen, floating = autocast and ref.dtype in _HALF, ref.is_floating_point()
    for _, param in layer.adapter_parameters(adapter_name):
        if param.is_meta:  # low_cpu_mem_usage: the dtype it would get below; values and device come on load
            if floating and param.is_floating_point():
                param.data = param.data.to(torch.float32 if widen else ref.dtype)
            continue
        if param.device == ref.device and not widen and (
                param.dtype == ref.dtype or not (floating and param.is_floating_point())):
            continue  # already on the base's device, in the dtype it would get below
        old = param.data
        # a base weight on meta (offloaded by accelerate, or empty) has no values: the adapter stays real
        data = old.to(device=old.device if ref.is_meta else ref.device)
        if floating and data.is_floating_point():
            # as HF PEFT: built in the base dtype, then widened, so that a seed gives HF PEFT's exact values
            data = data.to(ref.dtype)
            if widen:
                data = data.to(torch.float32)
        if data is not old:  # already on the right device and dtype: nothing to replace
            param.data = data


def place_loaded(layers, adapter_name: str) -> None:
    """After a load gave meta-device adapter weights their values: onto their base layer's device (the dtype
    is already final: `place_new`). A base still on meta (empty weights) leaves the file's values where they
    are."""
    for layer in layers:
        ref = placement_reference(layer)
        if ref is None or ref.is_meta:
            continue
        for _, param in layer.adapter_parameters(adapter_name):
            if not param.is_meta and param.device != ref.device:
                param.data = param.data.to(ref.device)
