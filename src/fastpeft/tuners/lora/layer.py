"""HF PEFT's module path `peft.tuners.lora.layer`."""

from ...methods.lora.layer import Embedding, Linear, LoraLayer, MultiheadAttention  # noqa: F401
