"""HF PEFT's module path `peft.tuners.multitask_prompt_tuning`: re-exports of
fastpeft.methods.multitask_prompt_tuning (the code lives there)."""

from ...methods.multitask_prompt_tuning import *  # noqa: F403
from ...methods.multitask_prompt_tuning import __all__  # noqa: F401
