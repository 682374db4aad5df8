"""X-LoRA: a mixture of frozen LoRA experts, gated per token and per layer by a trained classifier
(https://arxiv.org/abs/2402.07148). Built on LoRA's public classes (LoraModel, its Linear / Embedding
layers), as in HF PEFT."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .classifier import XLoraClassifier
from .config import XLoraConfig
from .layer import XLoraEmbeddingLayer, XLoraLayer, XLoraLinearLayer
from .model import XLoraModel

register(MethodSpec(peft_type=PeftType.XLORA, config_cls=XLoraConfig, prefix="lora_", tuner_cls=XLoraModel))

__all__ = ["XLoraClassifier", "XLoraConfig", "XLoraEmbeddingLayer", "XLoraLayer", "XLoraLinearLayer",
           "XLoraModel"]
