"""RandLoRA: full-rank updates from shared random bases (Albert et al., 2025,
https://arxiv.org/abs/2502.00987)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import RandLoraConfig
from .layer import RandLoraLinear
from .model import RandLoraModel

register(MethodSpec(peft_type=PeftType.RANDLORA, config_cls=RandLoraConfig, prefix="randlora_",
                    tuner_cls=RandLoraModel))

__all__ = ["RandLoraConfig", "RandLoraLinear", "RandLoraModel"]
