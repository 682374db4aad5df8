"""HiRA: Hadamard high-rank adaptation, the frozen weight modulated by a rank-r product
(https://openreview.net/pdf?id=TwJrTz9cRS)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .bnb import Linear4bit, Linear8bitLt
from .config import HiraConfig
from .layer import Conv1d, Conv2d, Conv3d, Embedding, HiraLayer, Linear
from .model import HiraModel

register(MethodSpec(peft_type=PeftType.HIRA, config_cls=HiraConfig, prefix="hira_", tuner_cls=HiraModel))

__all__ = ["Conv1d", "Conv2d", "Conv3d", "Embedding", "HiraConfig", "HiraLayer", "HiraModel", "Linear",
           "Linear4bit", "Linear8bitLt"]
