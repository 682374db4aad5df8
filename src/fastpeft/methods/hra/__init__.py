"""HRA: Householder reflection adaptation (https://arxiv.org/abs/2405.17484)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import HRAConfig
from .layer import Conv2d, HRALayer, Linear
from .model import HRAModel

register(MethodSpec(peft_type=PeftType.HRA, config_cls=HRAConfig, prefix="hra_", tuner_cls=HRAModel))

__all__ = ["Conv2d", "HRAConfig", "HRALayer", "HRAModel", "Linear"]
