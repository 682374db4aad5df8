"""DeLoRA: decoupled low-rank adaptation, a rank-r update with a trained norm bound
(https://arxiv.org/abs/2503.18225)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import DeloraConfig
from .layer import DeloraLinear
from .model import DeloraModel

register(MethodSpec(peft_type=PeftType.DELORA, config_cls=DeloraConfig, prefix="delora_",
                    tuner_cls=DeloraModel))

__all__ = ["DeloraConfig", "DeloraLinear", "DeloraModel"]
