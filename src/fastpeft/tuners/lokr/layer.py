"""HF PEFT's module path `peft.tuners.lokr.layer`."""

from ...methods.lokr.layer import Conv1d, Conv2d, Linear, LoKrLayer, factorization  # noqa: F401
