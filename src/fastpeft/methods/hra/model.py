"""`HRAModel`: the HRA tuner (nn.Linear and nn.Conv2d targets, LoRA's default targets per model type)."""

from __future__ import annotations

from torch import nn

from ...core import targeting
from ...core.dispatch import DispatchChain
from ...core.tuner import Tuner
from ...integrations.transformers_defaults import LORA_TARGETS, default_targets
from .layer import Conv2d, Linear

DISPATCH = DispatchChain("HRA")
DISPATCH.register(nn.Linear, Linear)
DISPATCH.register(nn.Conv2d, Conv2d)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


class BiasOptionMixin:
    """`bias`: 'all' trains every base bias, '<method>_only' those of the adapted layers (one such adapter per
    model, as HF PEFT)."""

    def check_new_adapter(self, config) -> None:
        others = [n for n, c in self.peft_config.items() if c is not config and c.bias != "none"]
        if others and config.bias != "none":
            raise ValueError(
                f"Adapter '{others[0]}' already trains base biases (bias={self.peft_config[others[0]].bias!r}); "
                "only one adapter per model may set bias other than 'none'.")

    def mark_extra_trainable(self, adapter_name: str, config) -> None:
        if config.bias == "all":
            for name, param in self.model.named_parameters():
                if name.rsplit(".", 1)[-1] == "bias" and ".modules_to_save." not in name \
                        and ".original_module." not in name:
                    param.requires_grad_(True)
        elif config.bias.endswith("_only"):
            for layer in self.adapter_layers():
                bias = getattr(layer.get_base_layer(), "bias", None)
                if adapter_name in layer.adapter_names() and bias is not None:
                    bias.requires_grad_(True)


def prepare_linear_targets(config, model, method: str):
    """Default targets by model type (HF PEFT reuses LoRA's table) and 'all-linear'."""
    if config.target_modules is None:
        config.target_modules = default_targets(LORA_TARGETS, model, method)
    elif isinstance(config.target_modules, str) and config.target_modules.lower() == targeting.ALL_LINEAR:
        config.target_modules = targeting.all_linear_targets(model, config.task_type, _is_linear)
    return config


class HRAModel(BiasOptionMixin, Tuner):
    dispatch = DISPATCH
    prefix = "hra_"

    def prepare_config(self, config, model):
        return prepare_linear_targets(config, model, "HRA")

    def layer_kwargs(self, config, key, module):
        return {"target_name": key}
