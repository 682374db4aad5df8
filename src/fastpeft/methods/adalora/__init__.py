"""AdaLoRA: SVD-form LoRA whose ranks are pruned by importance during training (Zhang et al., 2023,
https://openreview.net/forum?id=lq62uWRJjiY)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .allocator import RankAllocator
from .config import AdaLoraConfig
from .layer import AdaLoraLayer, SVDConv2d, SVDLinear
from .model import AdaLoraModel

register(MethodSpec(peft_type=PeftType.ADALORA, config_cls=AdaLoraConfig, prefix="lora_",
                    tuner_cls=AdaLoraModel, mixable=True))


def __getattr__(name):
    if name == "AdaLoraCallback":  # needs transformers: imported on first use only
        from .callback import AdaLoraCallback

        return AdaLoraCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AdaLoraCallback", "AdaLoraConfig", "AdaLoraLayer", "AdaLoraModel", "RankAllocator", "SVDConv2d",
           "SVDLinear"]
