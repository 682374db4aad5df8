"""HF PEFT's module path `peft.tuners.delora`: re-exports of fastpeft.methods.delora (the code lives
there)."""

from ...methods.delora import *  # noqa: F403
from ...methods.delora import __all__  # noqa: F401
