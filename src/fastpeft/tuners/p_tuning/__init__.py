"""HF PEFT's module path `peft.tuners.p_tuning`: re-exports of fastpeft.methods.p_tuning (the code lives
there)."""

from ...methods.p_tuning import *  # noqa: F403
from ...methods.p_tuning import __all__  # noqa: F401
