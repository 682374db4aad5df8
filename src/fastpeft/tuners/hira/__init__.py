"""HF PEFT's module path `peft.tuners.hira`: re-exports of fastpeft.methods.hira (the code lives there)."""

from ...methods.hira import *  # noqa: F403
from ...methods.hira import __all__  # noqa: F401
