"""PSOFT: orthogonal fine-tuning in the principal subspace of each weight
(https://openreview.net/forum?id=FSHrinMArK)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import PsoftConfig
from .layer import Linear, PsoftLayer
from .model import PsoftModel

register(MethodSpec(peft_type=PeftType.PSOFT, config_cls=PsoftConfig, prefix="psoft_", tuner_cls=PsoftModel))

__all__ = ["Linear", "PsoftConfig", "PsoftLayer", "PsoftModel"]
