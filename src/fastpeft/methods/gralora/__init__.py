"""GraLoRA: granular low-rank adaptation, a k x k grid of small-rank block updates
(https://arxiv.org/abs/2505.20355)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import GraloraConfig
from .layer import GraloraLinear
from .model import GraloraModel

register(MethodSpec(peft_type=PeftType.GRALORA, config_cls=GraloraConfig, prefix="gralora_",
                    tuner_cls=GraloraModel))

# HF PEFT's names: its layer base class and its Linear are one class here
GraloraLayer = Linear = GraloraLinear

__all__ = ["GraloraConfig", "GraloraLayer", "GraloraLinear", "GraloraModel", "Linear"]
