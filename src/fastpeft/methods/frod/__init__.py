"""FRoD: full-rank adaptation on a basis shared by the layers of one role, training its diagonal and a
sparse off-diagonal part (https://doi.org/10.1609/aaai.v40i31.39813)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import FrodConfig
from .layer import FrodLinear
from .model import FrodModel

register(MethodSpec(peft_type=PeftType.FROD, config_cls=FrodConfig, prefix="frod_", tuner_cls=FrodModel))

__all__ = ["FrodConfig", "FrodLinear", "FrodModel"]
