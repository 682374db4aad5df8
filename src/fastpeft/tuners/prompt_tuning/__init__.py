"""HF PEFT's module path `peft.tuners.prompt_tuning`: re-exports of fastpeft.methods.prompt_tuning (the code
lives there)."""

from ...methods.prompt_tuning import *  # noqa: F403
from ...methods.prompt_tuning import __all__  # noqa: F401
