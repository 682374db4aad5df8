"""RoAd: 2D rotary adaptation, learned scaled rotations of pairs of output features
(https://arxiv.org/abs/2409.00119)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .bnb import Linear4bit, Linear8bitLt
from .config import RoadConfig
from .layer import Linear, RoadLayer
from .model import RoadModel

register(MethodSpec(peft_type=PeftType.ROAD, config_cls=RoadConfig, prefix="road_", tuner_cls=RoadModel))

__all__ = ["Linear", "Linear4bit", "Linear8bitLt", "RoadConfig", "RoadLayer", "RoadModel"]
