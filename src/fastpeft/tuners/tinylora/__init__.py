"""HF PEFT's module path `peft.tuners.tinylora`: re-exports of fastpeft.methods.tinylora (the code lives
there)."""

from ...methods.tinylora import *  # noqa: F403
from ...methods.tinylora import __all__  # noqa: F401
