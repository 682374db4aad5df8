"""LoKr: low-rank Kronecker-product adapters (LyCORIS) on linear and convolution layers."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import LoKrConfig
from .model import LoKrModel

register(MethodSpec(peft_type=PeftType.LOKR, config_cls=LoKrConfig, prefix="lokr_", tuner_cls=LoKrModel,
                    mixable=True))

__all__ = ["LoKrConfig", "LoKrModel"]
