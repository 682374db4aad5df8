"""HF PEFT's module path `peft.tuners.adalora`: re-exports of fastpeft.methods.adalora (the code lives
there)."""

from ...methods import adalora as _adalora
from ...methods.adalora import AdaLoraConfig, AdaLoraLayer, AdaLoraModel, RankAllocator, SVDConv2d, SVDLinear

__all__ = ["AdaLoraConfig", "AdaLoraLayer", "AdaLoraModel", "RankAllocator", "SVDConv2d", "SVDLinear"]


def __getattr__(name: str):
    return getattr(_adalora, name)  # AdaLoraCallback: imports transformers on first use only
