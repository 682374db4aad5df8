"""Which base modules count as linear layers, and their (in, out) sizes."""

from __future__ import annotations

from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style `Conv1D` (checked by class so importing fastpeft needs no transformers)."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers")
               for c in type(module).__mro__)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or a GPT-2 `Conv1D` (a linear layer whose weight is stored as (in, out))."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_dims(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or of a Conv1D (whose weight is stored as (in, out))."""
    if is_conv1d(base):
        shape = getattr(base.weight, "ds_shape", base.weight.shape)
        return int(shape[0]), int(shape[1])
    return base.in_features, base.out_features
