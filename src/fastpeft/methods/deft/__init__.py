"""DEFT: a trained low-rank subspace of each weight's output space removed and replaced by injected
content."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import DeftConfig
from .layer import DeftLinear
from .model import DeftModel

register(MethodSpec(peft_type=PeftType.DEFT, config_cls=DeftConfig, prefix="deft_", tuner_cls=DeftModel))

__all__ = ["DeftConfig", "DeftLinear", "DeftModel"]
