"""Adapter methods, one folder each; importing a folder registers its method."""

from . import (  # noqa: F401
    adaption_prompt,
    cpt,
    lora,
    multitask_prompt_tuning,
    p_tuning,
    prefix_tuning,
    prompt_tuning,
    trainable_tokens,
)
