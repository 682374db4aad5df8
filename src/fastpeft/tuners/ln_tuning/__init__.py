"""HF PEFT's module path `peft.tuners.ln_tuning`: re-exports of fastpeft.methods.ln_tuning (the code lives
there)."""

from ...methods.ln_tuning import *  # noqa: F403
from ...methods.ln_tuning import __all__  # noqa: F401
