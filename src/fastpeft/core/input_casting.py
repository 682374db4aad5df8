"""Switching off the adapter layers' input casts for a block of code (HF PEFT's
`peft.helpers.disable_input_dtype_casting`).

An adapter layer normally casts its input to the adapter weights' dtype. diffusers' layerwise casting keeps
weights in a storage dtype and upcasts each module just before it runs; there the cast would turn the input
into the storage dtype (lossy), so diffusers wraps each adapter layer's forward in this context manager.
Layers whose casts do not all go through `AdapterLayer.cast_input` cannot honour the switch: they are refused,
not ignored.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from .layer import AdapterLayer


def _layers(model: nn.Module) -> list[AdapterLayer]:
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    refused = sorted({f"{type(m).__module__}.{type(m).__name__}" for m in layers
                      if not m.input_cast_switchable})
    if refused:
        raise NotImplementedError(
            "disable_input_dtype_casting: these adapter layers always cast their input to the adapter's "
            f"dtype and cannot switch it off: {', '.join(refused)}. Use layerwise casting only on models "
            "whose adapters are of a method that supports it."
        )
    return layers


@contextmanager
def disable_input_dtype_casting(model: nn.Module, active: bool = True):
    """Inside the block, the adapter layers of `model` (or `model` itself, if it is one) leave their input in
    its own dtype; each layer's previous setting is restored afterwards. `active=False`: a no-op."""
    if not active:
        yield
        return
    layers = _layers(model)
    before = [(layer, layer.__dict__.get("cast_input_dtype_enabled")) for layer in layers]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for layer, value in before:
            if value is None:
                layer.__dict__.pop("cast_input_dtype_enabled", None)  # back to the class default
            else:
                layer.cast_input_dtype_enabled = value
