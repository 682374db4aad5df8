"""HF PEFT's module path `peft.tuners.lokr`: re-exports of fastpeft.methods.lokr (the code lives there)."""

from ...methods.lokr import *  # noqa: F403
from ...methods.lokr import __all__  # noqa: F401
from . import layer  # noqa: F401  (HF PEFT's submodule path)
