"""P-tuning (Liu et al., 2021): virtual tokens reparameterised by an MLP or LSTM+MLP encoder."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import PromptEncoderConfig, PromptEncoderReparameterizationType
from .model import PromptEncoder, PTuning

register(MethodSpec(peft_type=PeftType.P_TUNING, config_cls=PromptEncoderConfig, prefix="prompt_",
                    prompt_cls=PTuning))

__all__ = ["PromptEncoder", "PromptEncoderConfig", "PromptEncoderReparameterizationType"]
