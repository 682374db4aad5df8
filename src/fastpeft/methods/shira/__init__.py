"""SHiRA: sparse high-rank adapters (https://arxiv.org/abs/2406.13175)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import ShiraConfig
from .layer import Linear
from .masks import random_mask
from .model import ShiraModel

register(MethodSpec(peft_type=PeftType.SHIRA, config_cls=ShiraConfig, prefix="shira_", tuner_cls=ShiraModel,
                    mixable=True))

ShiraLayer = Linear  # HF PEFT's base class name; SHiRA has one layer kind

__all__ = ["Linear", "ShiraConfig", "ShiraLayer", "ShiraModel", "random_mask"]
