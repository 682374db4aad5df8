"""HF PEFT's module path `peft.tuners.loha`: re-exports of fastpeft.methods.loha (the code lives there)."""

from ...methods.loha import *  # noqa: F403
from ...methods.loha import __all__  # noqa: F401
from . import layer  # noqa: F401  (HF PEFT's submodule path)
