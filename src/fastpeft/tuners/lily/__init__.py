"""HF PEFT's module path `peft.tuners.lily`: re-exports of fastpeft.methods.lily (the code lives there)."""

from ...methods.lily import *  # noqa: F403
from ...methods.lily import __all__  # noqa: F401
