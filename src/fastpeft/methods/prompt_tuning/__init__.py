"""Prompt tuning: trainable virtual-token embeddings in front of the input."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import PromptTuningConfig, PromptTuningInit
from .model import PromptEmbedding, PromptTuning

register(MethodSpec(peft_type=PeftType.PROMPT_TUNING, config_cls=PromptTuningConfig, prefix="prompt_",
                    prompt_cls=PromptTuning))

__all__ = ["PromptEmbedding", "PromptTuningConfig", "PromptTuningInit"]
