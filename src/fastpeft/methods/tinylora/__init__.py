"""TinyLoRA: a tiny trained vector mixing frozen random matrices between the frozen SVD factors of each
weight ("Learning to Reason in 13 Parameters", https://arxiv.org/abs/2602.04118)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import TinyLoraConfig
from .layer import TinyLoraEmbedding, TinyLoraLayer, TinyLoraLinear
from .model import TinyLoraModel

register(MethodSpec(peft_type=PeftType.TINYLORA, config_cls=TinyLoraConfig, prefix="tinylora_",
                    tuner_cls=TinyLoraModel))

__all__ = ["TinyLoraConfig", "TinyLoraEmbedding", "TinyLoraLayer", "TinyLoraLinear", "TinyLoraModel"]
