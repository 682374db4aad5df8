"""`GraloraModel`: the GraLoRA tuner (nn.Linear and transformers Conv1D targets, LoRA's default targets per
model type as in HF PEFT, the `bias` option)."""

from __future__ import annotations

from torch import nn

from ...core.dispatch import DispatchChain
from ...core.layer import AdapterLayer
from ...integrations.transformers_defaults import LORA_TARGETS
from .._shared.common import align_fan_in_fan_out, fill_targets
from .._shared.modules import is_linear
from .._shared.tuners import LinearFamilyTuner
from .layer import GraloraLinear

# HF PEFT's GraLoRA table is a copy of LoRA's
GRALORA_TARGETS: dict[str, list[str]] = dict(LORA_TARGETS)

DISPATCH = DispatchChain("GraLoRA")
DISPATCH.register(is_linear, GraloraLinear)


class GraloraModel(LinearFamilyTuner):
    dispatch = DISPATCH

    def prepare_config(self, config, model):
        # 'all-linear' takes Conv1D layers too: GraLoRA adapts them
        return fill_targets(config, model, GRALORA_TARGETS, self.dispatch.method, is_linear)

    def layer_kwargs(self, config, key: str, module: nn.Module) -> dict:
        if not isinstance(module, AdapterLayer):
            align_fan_in_fan_out(config, module, key)
        return {"target_name": key}
