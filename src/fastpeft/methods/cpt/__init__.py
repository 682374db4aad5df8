"""CPT (Context-aware Prompt Tuning): in-context examples as a prompt whose embeddings move only a little."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import CPTConfig
from .model import CPT, CPTEmbedding

register(MethodSpec(peft_type=PeftType.CPT, config_cls=CPTConfig, prefix="prompt_", prompt_cls=CPT))

__all__ = ["CPTConfig", "CPTEmbedding"]
