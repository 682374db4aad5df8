"""`HRAModel`: the HRA tuner (nn.Linear and nn.Conv2d targets, LoRA's default targets per model type)."""

from __future__ import annotations

from torch import nn

from ...core.dispatch import DispatchChain
from ...core.tuner import Tuner
from ...integrations.transformers_defaults import LORA_TARGETS
from ..common import fill_targets, is_nn_linear, refuse_second_bias_adapter, train_base_biases
from .layer import Conv2d, Linear

DISPATCH = DispatchChain("HRA")
DISPATCH.register(nn.Linear, Linear)
DISPATCH.register(nn.Conv2d, Conv2d)


class LinearFamilyTuner(Tuner):
    """What HRA and MiSS tuners share: LoRA's default targets per model type (HF PEFT reuses that table) and
    'all-linear', layers told their module name, and `bias`: 'all' trains every base bias, '<method>_only' those
    of the adapted layers (one such adapter per model, as HF PEFT). A subclass gives `dispatch` and `prefix`."""

    def prepare_config(self, config, model):
        return fill_targets(config, model, LORA_TARGETS, self.dispatch.method, is_nn_linear)

    def layer_kwargs(self, config, key, module):
        return {"target_name": key}

    def check_new_adapter(self, config) -> None:
        refuse_second_bias_adapter(self.peft_config, config, self.dispatch.method)

    def mark_extra_trainable(self, adapter_name: str, config) -> None:
        train_base_biases(self, adapter_name, config.bias)


class HRAModel(LinearFamilyTuner):
    dispatch = DISPATCH
    prefix = "hra_"
