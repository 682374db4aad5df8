"""LN tuning: train a copy of the model's normalisation layers (https://arxiv.org/abs/2312.11420)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import LNTuningConfig
from .layer import LNTuningLayer
from .model import LNTuningModel

register(MethodSpec(peft_type=PeftType.LN_TUNING, config_cls=LNTuningConfig, prefix="ln_tuning_",
                    tuner_cls=LNTuningModel))

__all__ = ["LNTuningConfig", "LNTuningLayer", "LNTuningModel"]
