"""`PsoftModel`: the PSOFT tuner (nn.Linear targets; LoRA's default targets per model type, as HF PEFT)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ...core.dispatch import DispatchChain
from ...core.tuner import Tuner
from ...integrations.transformers_defaults import LORA_TARGETS
from .._shared.common import fill_targets_fan_out_off, linear_targets_checked
from .._shared.modules import is_linear
from .layer import SVD_DTYPES, Linear, check_fits

logger = logging.getLogger(__name__)

DISPATCH = DispatchChain("PSOFT")
DISPATCH.register(nn.Linear, Linear)

# as HF PEFT: a copy of LoRA's table
PSOFT_TARGETS: dict[str, list[str]] = dict(LORA_TARGETS)


class PsoftModel(Tuner):
    """Adds PSOFT adapters to a model's nn.Linear layers. 'all-linear' selects Conv1D layers too, as HF PEFT,
    which PSOFT then refuses by name."""

    dispatch = DISPATCH

    def prepare_config(self, config, model):
        return fill_targets_fan_out_off(
            config, model, PSOFT_TARGETS, "PSOFT", is_linear,
            "PSOFT adapts nn.Linear layers, whose weight is stored (out, in): setting fan_in_fan_out=False.",
            logger)

    def layer_kwargs(self, config, key, module):
        return {"target_name": key}

    def select_targets(self, model, config):
        """The targets, each checked before any layer is built: r fits it and its weight can be factorised."""
        def check(base: nn.Linear, name: str) -> None:
            check_svd_input(base.weight, name)
            check_fits(config.r, base.in_features, base.out_features, name)

        return linear_targets_checked(super().select_targets(model, config), check)


def check_svd_input(weight: torch.Tensor, where: str) -> None:
    """A and B come from an SVD of the weight: it must hold real floating values."""
    if weight.is_meta:
        raise ValueError(f"PSOFT cannot adapt '{where}': its weight is on the meta device, and A / B are "
                         "built from an SVD of the weight's values. Load the base model's weights first.")
    if weight.dtype not in SVD_DTYPES:
        raise TypeError(f"PSOFT cannot adapt '{where}': A / B are built from an SVD of its weight, which "
                        f"needs float32, float16 or bfloat16 values, not {weight.dtype} (a quantised layer?)")
