"""Multitask prompt tuning: a shared soft prompt scaled per task by a low-rank matrix (select with
task_ids)."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import MultitaskPromptTuningConfig, MultitaskPromptTuningInit
from .model import MultitaskPromptEmbedding, MultitaskPromptTuning

register(MethodSpec(peft_type=PeftType.MULTITASK_PROMPT_TUNING, config_cls=MultitaskPromptTuningConfig,
                    prefix="prompt_", prompt_cls=MultitaskPromptTuning))

__all__ = ["MultitaskPromptEmbedding", "MultitaskPromptTuningConfig", "MultitaskPromptTuningInit"]
