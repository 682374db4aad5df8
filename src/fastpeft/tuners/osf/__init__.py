"""HF PEFT's module path `peft.tuners.osf`: re-exports of fastpeft.methods.osf (the code lives there)."""

from ...methods.osf import *  # noqa: F403
from ...methods.osf import __all__  # noqa: F401
