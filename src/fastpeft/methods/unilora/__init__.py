"""Uni-LoRA: every layer's LoRA factors read from one trained vector through fixed, seeded indices."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import UniLoraConfig
from .layer import UniLoraLinear
from .model import UniLoraModel

register(MethodSpec(peft_type=PeftType.UNILORA, config_cls=UniLoraConfig, prefix="unilora_",
                    tuner_cls=UniLoraModel))

__all__ = ["UniLoraConfig", "UniLoraLinear", "UniLoraModel"]
