"""HF PEFT's module path `peft.tuners.ia3`: re-exports of fastpeft.methods.ia3 (the code lives there)."""

from ...methods.ia3 import *  # noqa: F403
from ...methods.ia3 import __all__  # noqa: F401
