"""HF PEFT's module path `peft.tuners.vblora`: re-exports of fastpeft.methods.vblora (the code lives
there)."""

from ...methods.vblora import *  # noqa: F403
from ...methods.vblora import __all__  # noqa: F401
