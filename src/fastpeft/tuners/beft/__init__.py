"""HF PEFT's module path `peft.tuners.beft`: re-exports of fastpeft.methods.beft (the code lives there)."""

from ...methods.beft import *  # noqa: F403
from ...methods.beft import __all__  # noqa: F401
