"""`BOFTModel`: the tuner of the BOFT method (Linear and Conv2d layers).

boft_n_butterfly_factor (Liu et al., 2024, https://arxiv.org/abs/2311.06243, Sec. 4): HF PEFT 0.21.2 builds
N > 1 factors only when its fbd_cuda extension compiles (a CUDA machine with ninja / nvcc); everywhere else it
warns and builds one factor. New fastpeft adapters always take that one-factor form, so their files load in HF
PEFT where it usually runs; a file holding N factors (boft_R of shape (N, D, H, H)) is loaded with all N
(`convert_loaded_state`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ...core.dispatch import DispatchChain
from .._shared.tuners import OrthogonalTuner
from .layer import BOFTLayer, Conv2d, Linear

logger = logging.getLogger(__name__)

DISPATCH = DispatchChain("BOFT")
DISPATCH.register(nn.Linear, Linear)
DISPATCH.register(nn.Conv2d, Conv2d)


class BOFTModel(OrthogonalTuner):
    dispatch = DISPATCH

    def prepare_config(self, config, model):
        config = super().prepare_config(config, model)
        factors = config.boft_n_butterfly_factor
        if factors > 1:
            logger.warning(
                "BOFT: boft_n_butterfly_factor=%d is built as a single block-diagonal factor, like HF PEFT "
                "without its fbd_cuda extension, so the adapter files load in HF PEFT; adapter files saved "
                "with %d factors (HF PEFT with the extension) still load with all of them.", factors, factors)
        return config

    def convert_loaded_state(self, adapter_name, tensors, root):
        """Before the copy: layers whose file boft_R holds another number of factors (same D x H blocks) are
        rebuilt with that many. Every layer is checked before any is changed."""
        plan = []
        for prefix, layer in root.named_modules():
            if not isinstance(layer, BOFTLayer) or adapter_name not in layer.boft_R:
                continue
            key = f"{prefix}.boft_R" if prefix else "boft_R"
            factors = _file_factor_count(tensors.get(key), layer.boft_R[adapter_name])
            if factors is not None:
                _check_factor_count(layer, adapter_name, factors, key)
                plan.append((layer, factors))
        for layer, factors in plan:
            layer.set_factor_count(adapter_name, factors)
        return tensors


def _file_factor_count(value, current: torch.Tensor) -> int | None:
    """N of a file's (N, D, H, H) boft_R when only N differs from the layer's; None otherwise (other
    mismatches are reported by the shape check of the load)."""
    if value is None or value.dim() != 4 or tuple(value.shape[1:]) != tuple(current.shape[1:]):
        return None
    return None if value.shape[0] == current.shape[0] else int(value.shape[0])


def _check_factor_count(layer: BOFTLayer, adapter_name: str, factors: int, key: str) -> None:
    """`set_factor_count`'s refusal, raised before any layer changes and naming the file key."""
    try:
        layer.check_factor_count(adapter_name, factors)
    except ValueError as err:
        _, num, size, _ = layer.boft_R[adapter_name].shape
        raise ValueError(f"BOFT: cannot load {key} with {factors} butterfly factors of {num} blocks of "
                         f"{size} x {size}: {err}") from None
