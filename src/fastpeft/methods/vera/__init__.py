"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al., 2023, https://arxiv.org/abs/2310.11454)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import VeraConfig
from .layer import VeraLinear
from .model import VeraModel

register(MethodSpec(peft_type=PeftType.VERA, config_cls=VeraConfig, prefix="vera_lambda_",
                    tuner_cls=VeraModel))

__all__ = ["VeraConfig", "VeraLinear", "VeraModel"]
