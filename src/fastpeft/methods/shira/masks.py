"""SHiRA's built-in mask: `r * (out + in)` positions of a (out, in) weight drawn by a seeded permutation.

A mask function takes `(base_layer, r, **kwargs)` and returns a 0/1 tensor of the weight's (out, in) shape.
"""

from __future__ import annotations

import torch
from torch import nn

from .._shared.modules import linear_dims


def random_mask(base_layer: nn.Module, r: int, random_seed: int | None = None, **kwargs) -> torch.Tensor:
    """Bool (out, in) mask with ones at the first r * (out + in) entries of a permutation of the flattened
    weight. The generator is seeded with `random_seed` when given, else left at torch's default seed (so
    every call, as in HF PEFT, gives the same positions for the same shape)."""
    n_in, n_out = linear_dims(base_layer)
    generator = torch.Generator()
    if random_seed is not None:
        generator.manual_seed(random_seed)
    picked = torch.randperm(n_out * n_in, generator=generator)[: r * (n_out + n_in)]
    mask = torch.zeros(n_out * n_in, dtype=torch.bool)
    mask[picked] = True
    return mask.view(n_out, n_in).to(base_layer.weight.device)
