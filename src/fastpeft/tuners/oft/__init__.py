"""HF PEFT's module path `peft.tuners.oft`: re-exports of fastpeft.methods.oft (the code lives there)."""

from ...methods.oft import *  # noqa: F403
from ...methods.oft import __all__  # noqa: F401
