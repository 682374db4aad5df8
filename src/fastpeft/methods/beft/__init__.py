"""BEFT: bias-efficient fine-tuning, a trained bias on the value projections (https://arxiv.org/abs/2509.15974)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import BeftConfig
from .layer import Linear
from .model import BeftModel

register(MethodSpec(peft_type=PeftType.BEFT, config_cls=BeftConfig, prefix="beft_", tuner_cls=BeftModel))

BeftLayer = Linear  # HF PEFT's base class name; BEFT has one layer kind

__all__ = ["BeftConfig", "BeftLayer", "BeftModel", "Linear"]
