"""HF PEFT's module path `peft.tuners.cartridge`: re-exports of fastpeft.methods.cartridge (the code lives
there)."""

from ...methods.cartridge import *  # noqa: F403
from ...methods.cartridge import __all__  # noqa: F401
