"""HF PEFT's module path `peft.tuners.deft`: re-exports of fastpeft.methods.deft (the code lives there)."""

from ...methods.deft import *  # noqa: F403
from ...methods.deft import __all__  # noqa: F401
