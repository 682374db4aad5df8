"""`CartridgeConfig` (Eyuboglu et al., 2025, "Cartridges"): a key/value cache prefix trained directly.

A cartridge compresses a long context into n virtual tokens whose keys and values are the parameters, served
like a prefix-tuning cache. The first `num_frozen_tokens` rows stay fixed: LLMs use early tokens as attention
sinks, and the paper (sec. 4) freezes the first one for stable training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PromptLearningConfig


@dataclass
class CartridgeConfig(PromptLearningConfig):
    num_frozen_tokens: int = field(default=1, metadata={
        "size": "dim",
        "help": "How many of the first virtual tokens stay frozen (no gradients); the paper freezes one, "
                "the attention sink."})

    def __post_init__(self) -> None:
        super().__post_init__()
        frozen = self.num_frozen_tokens
        if not isinstance(frozen, int) or isinstance(frozen, bool):
            raise ValueError(f"num_frozen_tokens must be an integer, got {frozen!r}.")
        if frozen < 0:
            raise ValueError(f"num_frozen_tokens must be >= 0, got {frozen}.")
        n = self.num_virtual_tokens
        if n is not None and frozen > n:
            raise ValueError(
                f"num_frozen_tokens must be <= num_virtual_tokens, got num_frozen_tokens={frozen} and "
                f"num_virtual_tokens={n}: lower num_frozen_tokens or add virtual tokens.")
