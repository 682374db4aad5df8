"""`ShiraModel`: the SHiRA tuner (nn.Linear targets, LoRA's default targets per model type except phi)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ...core.dispatch import DispatchChain
from ...core.tuner import Tuner
from ...integrations.transformers_defaults import LORA_TARGETS
from .._shared.common import fill_targets_fan_out_off, is_nn_linear
from .layer import Linear

logger = logging.getLogger(__name__)

# as HF PEFT: LoRA's table, with phi adapting its query and value projections only
SHIRA_TARGETS: dict[str, list[str]] = {**LORA_TARGETS, "phi": ["q_proj", "v_proj"]}

DISPATCH = DispatchChain("SHiRA")
DISPATCH.register(nn.Linear, Linear)

INDEX_KEY = ".shira_indices"


class ShiraModel(Tuner):
    dispatch = DISPATCH
    layer_family = Linear

    def prepare_config(self, config, model):
        return fill_targets_fan_out_off(
            config, model, SHIRA_TARGETS, "SHiRA", is_nn_linear,
            "SHiRA adapts nn.Linear layers (weight stored (out, in)): setting fan_in_fan_out=False.", logger)

    def layer_kwargs(self, config, key: str, module: nn.Module) -> dict:
        return {"target_name": key}

    def convert_loaded_state(self, adapter_name: str, tensors: dict[str, torch.Tensor],
                             root: nn.Module) -> dict[str, torch.Tensor]:
        """Saved positions are checked against their layer before anything is written (an index outside the
        weight would only fail later, in forward); the layers then take them as their positions."""
        for key, value in tensors.items():
            if not key.endswith(INDEX_KEY):
                continue
            try:
                layer = root.get_submodule(key[: -len(INDEX_KEY)])
            except AttributeError:
                continue  # reported as an unexpected key by the load
            if not isinstance(layer, Linear) or value.dim() != 2 or value.shape[0] != 2:
                continue  # a shape mismatch is reported by the load
            _check_positions(key, value, layer)
            layer.positions_pending[adapter_name] = False
        return tensors


def _check_positions(key: str, value: torch.Tensor, layer: Linear) -> None:
    if value.is_floating_point() and not torch.equal(value, value.round()):
        raise ValueError(f"SHiRA file tensor {key} holds non-integer positions.")
    rows, cols = value[0], value[1]
    if value.numel() and (rows.min() < 0 or cols.min() < 0 or rows.max() >= layer.out_features
                          or cols.max() >= layer.in_features):
        raise ValueError(
            f"SHiRA file tensor {key} holds positions outside the layer's ({layer.out_features}, "
            f"{layer.in_features}) weight: the adapter was saved for another base model.")
