"""HF PEFT's module path `peft.tuners.glora`: re-exports of fastpeft.methods.glora (the code lives there)."""

from ...methods.glora import *  # noqa: F403
from ...methods.glora import __all__  # noqa: F401
