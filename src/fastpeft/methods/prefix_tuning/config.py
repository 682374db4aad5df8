"""`PrefixTuningConfig` (Li & Liang, 2021): trainable key/value prefixes for every attention layer."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PromptLearningConfig


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    init_weights: str | None = field(default=None, metadata={"help": "None (random) or 'zero'."})
    encoder_hidden_size: int | None = field(default=None, metadata={
        "size": "dim", "help": "Projection MLP width."})
    prefix_projection: bool = field(default=False, metadata={"help": "Reparameterise through an MLP."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}.")
