"""Bottleneck adapters (Houlsby / Pfeiffer / parallel) as the `adapters` library (AdapterHub) defines them;
fastpeft's own method (HF PEFT has none), with an importer for AdapterHub adapter folders."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .adapterhub import load_adapterhub_adapter
from .config import BottleneckConfig
from .layer import BottleneckBlock, BottleneckLayer
from .model import BottleneckModel

register(MethodSpec(peft_type=PeftType.BOTTLENECK, config_cls=BottleneckConfig, prefix="bottleneck_",
                    tuner_cls=BottleneckModel))

__all__ = ["BottleneckBlock", "BottleneckConfig", "BottleneckLayer", "BottleneckModel",
           "load_adapterhub_adapter"]
