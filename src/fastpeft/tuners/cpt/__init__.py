"""HF PEFT's module path `peft.tuners.cpt`: re-exports of fastpeft.methods.cpt (the code lives there)."""

from ...methods.cpt import *  # noqa: F403
from ...methods.cpt import __all__  # noqa: F401
