"""HF PEFT's module path `peft.tuners.vera`: re-exports of fastpeft.methods.vera (the code lives there)."""

from ...methods.vera import *  # noqa: F403
from ...methods.vera import __all__  # noqa: F401
