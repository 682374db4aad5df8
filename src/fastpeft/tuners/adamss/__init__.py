"""HF PEFT's module path `peft.tuners.adamss`: re-exports of fastpeft.methods.adamss (the code lives
there)."""

from ...methods.adamss import *  # noqa: F403
from ...methods.adamss import __all__  # noqa: F401
