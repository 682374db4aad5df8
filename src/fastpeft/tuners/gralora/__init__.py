"""HF PEFT's module path `peft.tuners.gralora`: re-exports of fastpeft.methods.gralora (the code lives
there)."""

from ...methods.gralora import *  # noqa: F403
from ...methods.gralora import __all__  # noqa: F401
