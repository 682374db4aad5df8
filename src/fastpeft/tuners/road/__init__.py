"""HF PEFT's module path `peft.tuners.road`: re-exports of fastpeft.methods.road (the code lives there)."""

from ...methods.road import *  # noqa: F403
from ...methods.road import __all__  # noqa: F401
