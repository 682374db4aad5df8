"""HF PEFT's module path `peft.tuners.peanut`: re-exports of fastpeft.methods.peanut (the code lives
there)."""

from ...methods.peanut import *  # noqa: F403
from ...methods.peanut import __all__  # noqa: F401
