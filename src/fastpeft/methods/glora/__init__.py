"""GLoRA: generalised LoRA (https://arxiv.org/abs/2306.07967)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import GloraConfig
from .layer import GloraLayer, GloraLinear
from .model import GloraModel

register(MethodSpec(peft_type=PeftType.GLORA, config_cls=GloraConfig, prefix="glora_", tuner_cls=GloraModel))

__all__ = ["GloraConfig", "GloraLayer", "GloraLinear", "GloraModel"]
