"""MiCA, `init_lora_weights="mica"` (Minor Component Adaptation, arXiv:2604.01694).

The update lives in the subspace the base weight uses least: B (out, r) holds the left singular vectors of W
(out, in) with the r smallest singular values and never trains; A starts at zero and is the only trained
factor. So B A = 0 at init (the base weight is left as it is), and forward and merging are those of plain
LoRA. On embeddings W^T (dim, vocab) plays the linear weight: B (dim, r), A (r, vocab).
"""

from __future__ import annotations

import torch

from ..variants.base import AdditiveMerge

DECOMPOSABLE = (torch.float32, torch.float16, torch.bfloat16)


def _minor_directions(layer, name: str, w: torch.Tensor) -> torch.Tensor:
    """U[:, -r:] of W = U S V^T (w: (out, in), any dtype): the r left singular vectors with the smallest
    values."""
    r, limit = layer.r[name], min(w.shape)
    if r > limit:
        raise ValueError(
            f"init_lora_weights='mica' needs r <= min(out, in) = {limit} for a layer whose weight is "
            f"{tuple(layer.get_base_layer().weight.shape)}, got r={r}; lower r (rank_pattern "
            "can set it per layer)."
        )
    u, _, _ = torch.linalg.svd(w.detach().to(torch.float32), full_matrices=False)
    return u[:, -r:]


@torch.no_grad()
def mica_init(layer, name: str) -> None:
    """INIT_SCHEMES["mica"]: B from the minor left singular vectors of the base weight, A zero (base
    dtype)."""
    weight = layer.get_base_layer().weight
    if weight.device.type == "meta":  # built empty, filled from a file later (as HF PEFT: no SVD then)
        return
    if weight.dtype not in DECOMPOSABLE:
        raise TypeError(f"init_lora_weights='mica' needs a float32, float16 or bfloat16 base weight, got "
                        f"{weight.dtype}; initialise on the unquantised model.")
    if layer.is_embedding:
        w = weight.T  # (dim, vocab)
    else:
        w = weight.T if layer.fan_in_fan_out else weight  # (out, in)
    b = _minor_directions(layer, name, w)
    weight_a, weight_b = layer.lora_weights(name)
    weight_b.data = b.contiguous().to(weight.dtype)
    weight_a.data = torch.zeros(weight_a.shape, dtype=weight.dtype, device=weight.device)


class MiCA(AdditiveMerge):
    """MiCA on a linear layer (incl. Conv1D): plain LoRA with lora_B frozen."""

    def frozen_parameters(self, layer, name):
        return (layer.lora_weights(name)[1],)

    def init(self, layer, name):
        for param in self.frozen_parameters(layer, name):
            param.requires_grad_(False)

    def contribution(self, layer, name, x, result):
        x = layer.cast_input(x, layer.lora_weights(name)[0].dtype)
        return layer.lora_path(name, layer.lora_dropout[name](x))


class MiCAEmbedding(MiCA):
    """MiCA on an embedding: plain LoRA on embeddings (no dropout) with lora_embedding_B frozen."""

    def contribution(self, layer, name, x, result):
        return layer.lora_path(name, x)
