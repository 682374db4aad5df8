"""HF PEFT's module path `peft.tuners.psoft`: re-exports of fastpeft.methods.psoft (the code lives there)."""

from ...methods.psoft import *  # noqa: F403
from ...methods.psoft import __all__  # noqa: F401
