"""Lily: low-rank interconnected adaptation across layers (https://arxiv.org/abs/2407.09946)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import LilyConfig
from .layer import LilyLayer, Linear
from .model import LilyModel

register(MethodSpec(peft_type=PeftType.LILY, config_cls=LilyConfig, prefix="lily_", tuner_cls=LilyModel))

__all__ = ["LilyConfig", "LilyLayer", "LilyModel", "Linear"]
