"""OFT: orthogonal finetuning with block-diagonal Cayley rotations (Qiu et al., 2023)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import OFTConfig
from .layer import Conv2d, Embedding, Linear, OFTLayer, OFTRotation
from .model import OFTModel

register(MethodSpec(peft_type=PeftType.OFT, config_cls=OFTConfig, prefix="oft_", tuner_cls=OFTModel,
                    mixable=True))

__all__ = ["Conv2d", "Embedding", "Linear", "OFTConfig", "OFTLayer", "OFTModel", "OFTRotation"]
