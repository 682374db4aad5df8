"""HF PEFT's module path `peft.tuners.supertuning`: re-exports of fastpeft.methods.supertuning (the code
lives there)."""

from ...methods.supertuning import *  # noqa: F403
from ...methods.supertuning import __all__  # noqa: F401
