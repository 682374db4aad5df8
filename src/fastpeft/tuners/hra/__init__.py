"""HF PEFT's module path `peft.tuners.hra`: re-exports of fastpeft.methods.hra (the code lives there)."""

from ...methods.hra import *  # noqa: F403
from ...methods.hra import __all__  # noqa: F401
