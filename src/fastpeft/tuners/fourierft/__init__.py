"""HF PEFT's module path `peft.tuners.fourierft`: re-exports of fastpeft.methods.fourierft (the code lives
there)."""

from ...methods.fourierft import *  # noqa: F403
from ...methods.fourierft import __all__  # noqa: F401
