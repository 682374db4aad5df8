"""HF PEFT's module path `peft.tuners.pvera`: re-exports of fastpeft.methods.pvera (the code lives there)."""

from ...methods.pvera import *  # noqa: F403
from ...methods.pvera import __all__  # noqa: F401
