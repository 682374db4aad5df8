"""HF PEFT's module path `peft.tuners.lora.config`."""

from ...methods.lora.config import LoraConfig, LoraRuntimeConfig  # noqa: F401
