"""VB-LoRA: LoRA factors composed from one vector bank shared across all adapted layers."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import VBLoRAConfig
from .layer import VBLoRALinear
from .model import VBLoRAModel

register(MethodSpec(peft_type=PeftType.VBLORA, config_cls=VBLoRAConfig, prefix="vblora_",
                    tuner_cls=VBLoRAModel))

__all__ = ["VBLoRAConfig", "VBLoRALinear", "VBLoRAModel"]
