"""C3A: circular convolution adaptation (https://arxiv.org/abs/2407.19342)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import C3AConfig
from .layer import C3ALinear
from .model import C3AModel

register(MethodSpec(peft_type=PeftType.C3A, config_cls=C3AConfig, prefix="c3a_", tuner_cls=C3AModel))

__all__ = ["C3AConfig", "C3ALinear", "C3AModel"]
