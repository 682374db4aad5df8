"""OSF: orthogonal subspace fine-tuning, training a weight's low singular triplets with gradients kept off
its frozen top subspace (https://arxiv.org/abs/2504.07097)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import OSFConfig
from .layer import OsfLinear
from .model import OSFModel

register(MethodSpec(peft_type=PeftType.OSF, config_cls=OSFConfig, prefix="osf_", tuner_cls=OSFModel))

# HF PEFT's names for the layer class (it has one layer kind)
Linear = OSFLayer = OsfLinear

__all__ = ["Linear", "OSFConfig", "OSFLayer", "OSFModel", "OsfLinear"]
