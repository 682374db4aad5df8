"""HF PEFT's module path `peft.tuners.c3a`: re-exports of fastpeft.methods.c3a (the code lives there)."""

from ...methods.c3a import *  # noqa: F403
from ...methods.c3a import __all__  # noqa: F401
