"""LoRA: low-rank adapters on linear, embedding, convolution and multi-head attention layers."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import LoraConfig, LoraRuntimeConfig
from .model import LoraModel

register(MethodSpec(peft_type=PeftType.LORA, config_cls=LoraConfig, prefix="lora_", tuner_cls=LoraModel))

__all__ = ["LoraConfig", "LoraModel", "LoraRuntimeConfig"]
