"""`PeanutModel`: the PEANuT tuner (nn.Linear targets; LoRA's default targets per model type, as HF PEFT)."""

from __future__ import annotations

from torch import nn

from ...core.dispatch import DispatchChain
from ...core.tuner import Tuner
from ...integrations.transformers_defaults import LORA_TARGETS
from .._shared.common import fill_targets
from .._shared.modules import is_linear
from .layer import PeanutLinear

# HF PEFT's PEANuT table is a copy of LoRA's
PEANUT_TARGETS: dict[str, list[str]] = dict(LORA_TARGETS)

DISPATCH = DispatchChain("PEANuT")
DISPATCH.register(nn.Linear, PeanutLinear)


class PeanutModel(Tuner):
    dispatch = DISPATCH

    def prepare_config(self, config, model):
        # 'all-linear' lists Conv1D layers too, as HF PEFT does: the dispatch then refuses them by name
        return fill_targets(config, model, PEANUT_TARGETS, self.dispatch.method, is_linear)
