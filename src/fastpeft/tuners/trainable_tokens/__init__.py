"""HF PEFT's module path `peft.tuners.trainable_tokens`: re-exports of fastpeft.methods.trainable_tokens (the
code lives there)."""

from ...methods.trainable_tokens import *  # noqa: F403
from ...methods.trainable_tokens import __all__  # noqa: F401
