"""HF PEFT's module path `peft.utils.error`."""

from ..errors import NoMatchingPeftModuleError, PeftError  # noqa: F401
