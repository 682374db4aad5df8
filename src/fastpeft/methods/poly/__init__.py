"""Poly / MHR: per-task routing over an inventory of low-rank skills (select the task with task_ids)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import PolyConfig
from .layer import PolyLinear, PolyRouter
from .model import PolyModel

register(MethodSpec(peft_type=PeftType.POLY, config_cls=PolyConfig, prefix="poly_", tuner_cls=PolyModel))

__all__ = ["PolyConfig", "PolyLinear", "PolyModel", "PolyRouter"]
