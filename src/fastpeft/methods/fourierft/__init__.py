"""FourierFT: train a few random-position coefficients of each weight change's 2-D Fourier spectrum."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import FourierFTConfig
from .layer import FourierFTLinear
from .model import FourierFTModel

register(MethodSpec(peft_type=PeftType.FOURIERFT, config_cls=FourierFTConfig, prefix="fourierft_",
                    tuner_cls=FourierFTModel))

__all__ = ["FourierFTConfig", "FourierFTLinear", "FourierFTModel"]
