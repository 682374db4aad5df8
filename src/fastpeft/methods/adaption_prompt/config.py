"""`AdaptionPromptConfig` (LLaMA-Adapter, Zhang et al., 2023): HF PEFT 0.21's fields and defaults.

Not a prompt-learning config: the prompts live inside the top attention layers, so `is_adaption_prompt` is
True.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig


@dataclass
class AdaptionPromptConfig(PeftConfig):
    """Gated learned prompt tokens attended to by the top `adapter_layers` attention modules."""

    target_modules: str | None = field(
        default=None, metadata={"help": "Name of the attention sub-modules that get adaption prompts."})
    adapter_len: int | None = field(default=None, metadata={
        "size": "dim", "help": "Number of adaption prompt tokens."})
    adapter_layers: int | None = field(
        default=None, metadata={
            "size": "dim", "help": "Number of attention layers, counted from the top, that get prompts."})

    @property
    def is_adaption_prompt(self) -> bool:
        return True
