"""Scaling every adapter's contribution for a block of code (HF PEFT's `peft.helpers.rescale_adapter_scale`),
e.g. to trade how strongly a fine-tuned adapter acts against how much of the base model's behaviour it keeps
(the "wise-ft" style interpolation of Wortsman et al., 2022, applied to the adapter's scale)."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from .layer import AdapterLayer


def _scaled_layers(model: nn.Module) -> list[AdapterLayer]:
    """Adapter layers with a per-adapter scale; the others (and a model without any) are refused by name."""
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    if not layers:
        raise ValueError("rescale_adapter_scale: the model has no adapter layers.")
    for layer in layers:
        for name in layer.adapter_names():
            layer.initial_scaling(name)  # NotImplementedError naming the layer class when it has no scale
    return layers


@contextmanager
def rescale_adapter_scale(model: nn.Module, multiplier: float):
    """Inside the block, every adapter of every adapter layer acts `multiplier` times as strongly."""
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)):
        raise TypeError(f"rescale_adapter_scale: multiplier must be a float or an int, got "
                        f"{type(multiplier).__name__}.")
    layers = _scaled_layers(model)
    # plain numbers: a scale held as a tensor (compiled hot-swaps) is filled in place by _write_scaling
    kept = [(layer, {name: float(value) for name, value in layer.scaling.items()}) for layer in layers]
    try:
        for layer, scales in kept:
            for name, value in scales.items():
                layer._write_scaling(name, value * multiplier)
        yield
    finally:
        for layer, scales in kept:
            for name, value in scales.items():
                layer._write_scaling(name, value)
