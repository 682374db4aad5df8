"""WaveFT: a few trained coefficients of each weight change in a 2-D wavelet domain, mapped back by the
inverse wavelet transform (https://arxiv.org/abs/2505.12532)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import WaveFTConfig
from .layer import WaveFTLinear
from .model import WaveFTModel

register(MethodSpec(peft_type=PeftType.WAVEFT, config_cls=WaveFTConfig, prefix="waveft_",
                    tuner_cls=WaveFTModel))

__all__ = ["WaveFTConfig", "WaveFTLinear", "WaveFTModel"]
