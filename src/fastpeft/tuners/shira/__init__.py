"""HF PEFT's module path `peft.tuners.shira`: re-exports of fastpeft.methods.shira (the code lives there)."""

from ...methods.shira import *  # noqa: F403
from ...methods.shira import __all__  # noqa: F401
