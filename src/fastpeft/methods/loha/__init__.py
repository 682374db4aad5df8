"""LoHa: low-rank Hadamard-product adapters (FedPara / LyCORIS) on linear and convolution layers."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import LoHaConfig
from .model import LoHaModel

register(MethodSpec(peft_type=PeftType.LOHA, config_cls=LoHaConfig, prefix="hada_", tuner_cls=LoHaModel,
                    mixable=True))

__all__ = ["LoHaConfig", "LoHaModel"]
