"""HF PEFT's module path `peft.tuners.waveft`: re-exports of fastpeft.methods.waveft (the code lives
there)."""

from ...methods.waveft import *  # noqa: F403
from ...methods.waveft import __all__  # noqa: F401
