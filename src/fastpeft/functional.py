"""HF PEFT's module path `peft.functional`: adapter operations on a model injected with
`inject_adapter_in_model` (no PeftModel wrapper), as transformers' and diffusers' adapter APIs call them."""

from .api import delete_adapter, inject_adapter_in_model, set_adapter, set_requires_grad
from .model_utils import get_layer_status, get_model_status

__all__ = ["delete_adapter", "get_layer_status", "get_model_status", "inject_adapter_in_model", "set_adapter",
           "set_requires_grad"]
