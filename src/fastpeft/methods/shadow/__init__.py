"""ShadowPEFT: a trainable parallel shadow network riding a frozen decoder's layer loop, with gated
corrections and an auxiliary loss that trains the shadow network to run alone."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .cache import ShadowCache
from .config import ShadowConfig
from .detached import DetachedShadowModel
from .layer import ShadowCarrier, ShadowLayer
from .model import ShadowModel

register(MethodSpec(peft_type=PeftType.SHADOW, config_cls=ShadowConfig, prefix="shadow_",
                    tuner_cls=ShadowModel))

__all__ = ["DetachedShadowModel", "ShadowCache", "ShadowCarrier", "ShadowConfig", "ShadowLayer",
           "ShadowModel"]
