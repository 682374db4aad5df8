"""HF PEFT's module path `peft.tuners.poly`: re-exports of fastpeft.methods.poly (the code lives there)."""

from ...methods.poly import *  # noqa: F403
from ...methods.poly import __all__  # noqa: F401
