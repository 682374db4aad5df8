"""HF PEFT's module path `peft.tuners.frod`: re-exports of fastpeft.methods.frod (the code lives there)."""

from ...methods.frod import *  # noqa: F403
from ...methods.frod import __all__  # noqa: F401
