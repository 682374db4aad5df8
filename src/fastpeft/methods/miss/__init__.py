"""MiSS (formerly Bone): matrix shard sharing (https://arxiv.org/abs/2409.15371)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import MissConfig
from .layer import Linear
from .model import MissModel

register(MethodSpec(peft_type=PeftType.MISS, config_cls=MissConfig, prefix="miss_", tuner_cls=MissModel))

__all__ = ["Linear", "MissConfig", "MissModel"]
