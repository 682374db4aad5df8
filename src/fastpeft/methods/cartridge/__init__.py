"""Cartridges: a trained key/value cache prefix that stands in for a long context (served like prefix
tuning's cache)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import CartridgeConfig
from .model import Cartridge, CartridgeEncoder

register(MethodSpec(peft_type=PeftType.CARTRIDGE, config_cls=CartridgeConfig, prefix="prompt_",
                    prompt_cls=Cartridge))

__all__ = ["CartridgeConfig", "CartridgeEncoder"]
