"""Prefix tuning: trainable key/value prefixes handed to the model as a pre-filled cache."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import PrefixTuningConfig
from .model import PrefixEncoder, PrefixTuning

register(MethodSpec(peft_type=PeftType.PREFIX_TUNING, config_cls=PrefixTuningConfig, prefix="prompt_",
                    prompt_cls=PrefixTuning))

__all__ = ["PrefixEncoder", "PrefixTuningConfig"]
