"""Adaption prompt (LLaMA-Adapter): gated prompt tokens inside the top attention layers of Llama / Mistral
/ GPT-2."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import AdaptionPromptConfig
from .model import AdaptionPromptModel

register(MethodSpec(peft_type=PeftType.ADAPTION_PROMPT, config_cls=AdaptionPromptConfig, prefix="adaption_",
                    tuner_cls=AdaptionPromptModel))

__all__ = ["AdaptionPromptConfig", "AdaptionPromptModel"]
