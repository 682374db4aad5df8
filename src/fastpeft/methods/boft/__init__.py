"""BOFT: butterfly orthogonal finetuning (Liu et al., 2024)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import BOFTConfig
from .layer import BOFTLayer, Conv2d, Linear
from .model import BOFTModel

register(MethodSpec(peft_type=PeftType.BOFT, config_cls=BOFTConfig, prefix="boft_", tuner_cls=BOFTModel))

__all__ = ["BOFTConfig", "BOFTLayer", "BOFTModel", "Conv2d", "Linear"]
