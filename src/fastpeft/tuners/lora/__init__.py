"""HF PEFT's module path `peft.tuners.lora`: re-exports of fastpeft.methods.lora (the code lives there)."""

from ...methods.lora import LoraConfig, LoraModel, LoraRuntimeConfig
from ...methods.lora.layer import Embedding, Linear, LoraLayer, MultiheadAttention
from . import config, layer, model  # noqa: F401  (HF PEFT's submodule paths)

__all__ = ["Embedding", "Linear", "LoraConfig", "LoraLayer", "LoraModel", "LoraRuntimeConfig",
           "MultiheadAttention"]
