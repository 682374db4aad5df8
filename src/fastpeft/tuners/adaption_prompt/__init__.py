"""HF PEFT's module path `peft.tuners.adaption_prompt`: re-exports of fastpeft.methods.adaption_prompt (the
code lives there)."""

from ...methods.adaption_prompt import *  # noqa: F403
from ...methods.adaption_prompt import __all__  # noqa: F401
