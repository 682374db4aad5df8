"""`DeftModel`: the DEFT tuner (nn.Linear and transformers Conv1D targets, LoRA's default targets, `bias`)."""

from __future__ import annotations

from torch import nn

from ...core.dispatch import DispatchChain
from ...core.layer import AdapterLayer
from ...integrations.transformers_defaults import LORA_TARGETS
from .._shared.common import align_fan_in_fan_out, fill_targets
from .._shared.modules import is_linear
from .._shared.tuners import LinearFamilyTuner
from .layer import DeftLinear

# HF PEFT reuses LoRA's default targets for DEFT
DEFT_TARGETS = LORA_TARGETS

DISPATCH = DispatchChain("DEFT")
DISPATCH.register(is_linear, DeftLinear)


class DeftModel(LinearFamilyTuner):
    """As HF PEFT: LoRA's default targets per model type, 'all-linear' over nn.Linear and Conv1D layers,
    fan_in_fan_out corrected per layer type, `bias` (one adapter with biases per model)."""

    dispatch = DISPATCH

    def prepare_config(self, config, model):
        return fill_targets(config, model, DEFT_TARGETS, "DEFT", is_linear)

    def layer_kwargs(self, config, key: str, module: nn.Module) -> dict:
        if not isinstance(module, AdapterLayer):
            align_fan_in_fan_out(config, module, key)
        return {"target_name": key}
