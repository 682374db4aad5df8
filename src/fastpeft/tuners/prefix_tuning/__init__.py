"""HF PEFT's module path `peft.tuners.prefix_tuning`: re-exports of fastpeft.methods.prefix_tuning (the code
lives there)."""

from ...methods.prefix_tuning import *  # noqa: F403
from ...methods.prefix_tuning import __all__  # noqa: F401
