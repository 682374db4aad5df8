"""HF PEFT's module path `peft.tuners.miss`: re-exports of fastpeft.methods.miss (the code lives there)."""

from ...methods.miss import *  # noqa: F403
from ...methods.miss import __all__  # noqa: F401
