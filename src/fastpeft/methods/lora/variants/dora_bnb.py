"""DoRA on bitsandbytes 4-bit / 8-bit layers: the weight norm is taken over the dequantised base weight.

Kept apart from `../bnb.py` (the layer classes) so that `table.py` can name it without importing `layer.py`.
"""

from __future__ import annotations

import torch

from .dora import Dora


class DoraQuant(Dora):
    """DoRA (Liu et al. 2024, eq. 5) where W is the dequantised weight of a quantised base layer.

    The layer supplies `dense_weight()` (W, (out, in)) and `base_path(x)` (x W^T from the dense weight).
    """

    @torch.no_grad()
    def weight_norm(self, layer, name, weight=None):
        dense = layer.dense_weight() if weight is None else weight
        return super().weight_norm(layer, name, dense)

    def merge_dense(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        """W' = m (W + s B A) / ||W + s B A||_row for dense `weight` W (out, in), in W's dtype."""
        norm = self.weight_norm(layer, name, weight)
        delta = layer.delta_weight(name).to(weight.dtype)
        return (self._factor(layer, name, norm).to(weight.dtype) * (weight + delta)).to(weight.dtype)
