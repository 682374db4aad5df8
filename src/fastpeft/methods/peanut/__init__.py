"""PEANuT: weight-aware neural tweakers, a small network mapping each frozen weight to its update
(https://arxiv.org/abs/2410.01870)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import PeanutConfig
from .layer import PeanutLinear
from .model import PeanutModel

register(MethodSpec(peft_type=PeftType.PEANUT, config_cls=PeanutConfig, prefix="peanut_",
                    tuner_cls=PeanutModel))

# HF PEFT's names: its layer base class and its Linear are one class here
PeanutLayer = Linear = PeanutLinear

__all__ = ["Linear", "PeanutConfig", "PeanutLayer", "PeanutLinear", "PeanutModel"]
