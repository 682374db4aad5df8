"""HF PEFT's module path `peft.tuners.loha.layer`."""

from ...methods.loha.layer import Conv1d, Conv2d, Linear, LoHaLayer  # noqa: F401
