"""HF PEFT's module path `peft.tuners.randlora`: re-exports of fastpeft.methods.randlora (the code lives
there)."""

from ...methods.randlora import *  # noqa: F403
from ...methods.randlora import __all__  # noqa: F401
