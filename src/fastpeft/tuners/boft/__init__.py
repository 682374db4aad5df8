"""HF PEFT's module path `peft.tuners.boft`: re-exports of fastpeft.methods.boft (the code lives there)."""

from ...methods.boft import *  # noqa: F403
from ...methods.boft import __all__  # noqa: F401
