"""(IA)^3: learned vectors that rescale layer outputs (or feed-forward inputs); Liu et al., 2022."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import IA3Config
from .model import IA3Model

register(MethodSpec(peft_type=PeftType.IA3, config_cls=IA3Config, prefix="ia3_", tuner_cls=IA3Model))

__all__ = ["IA3Config", "IA3Model"]
