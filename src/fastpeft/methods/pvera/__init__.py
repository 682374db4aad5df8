"""PVeRA: probabilistic vector-based random matrix adaptation (https://arxiv.org/abs/2512.07703)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import PveraConfig
from .layer import PveraLinear
from .model import PveraModel

register(MethodSpec(peft_type=PeftType.PVERA, config_cls=PveraConfig, prefix="pvera_lambda_",
                    tuner_cls=PveraModel))

__all__ = ["PveraConfig", "PveraLinear", "PveraModel"]
