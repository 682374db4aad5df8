"""HF PEFT's module path `peft.tuners.unilora`: re-exports of fastpeft.methods.unilora (the code lives
there)."""

from ...methods.unilora import *  # noqa: F403
from ...methods.unilora import __all__  # noqa: F401
