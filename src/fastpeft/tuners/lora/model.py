"""HF PEFT's module path `peft.tuners.lora.model`."""

from ...methods.lora.model import LoraModel  # noqa: F401
