"""Super-Tuning: a magnitude-chosen sparse set of weight entries trained, optionally with a LoRA pair on top
(Supra) (https://arxiv.org/abs/2607.09287)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import SupertuningConfig
from .layer import SupertuningLinear
from .model import SupertuningModel

register(MethodSpec(peft_type=PeftType.SUPERTUNING, config_cls=SupertuningConfig, prefix="supertuning_",
                    tuner_cls=SupertuningModel))

# HF PEFT's names for the layer class (it has one layer kind)
Linear = SupertuningLayer = SupertuningLinear

__all__ = ["Linear", "SupertuningConfig", "SupertuningLayer", "SupertuningLinear", "SupertuningModel"]
