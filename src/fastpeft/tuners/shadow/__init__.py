"""HF PEFT's module path `peft.tuners.shadow`: re-exports of fastpeft.methods.shadow (the code lives
there)."""

from ...methods.shadow import *  # noqa: F403
from ...methods.shadow import __all__  # noqa: F401
