"""HF PEFT's module path `peft.tuners.xlora`: re-exports of fastpeft.methods.xlora (the code lives there)."""

from ...methods.xlora import XLoraConfig, XLoraModel

__all__ = ["XLoraConfig", "XLoraModel"]
