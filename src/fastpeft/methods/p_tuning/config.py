"""`PromptEncoderConfig`: p-tuning's encoder type and sizes."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ...config import PromptLearningConfig


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = field(
        default=PromptEncoderReparameterizationType.MLP, metadata={"help": "MLP or LSTM."})
    encoder_hidden_size: int | None = field(default=None, metadata={
        "size": "dim", "help": "Encoder width (default token_dim)."})
    encoder_num_layers: int = field(default=2, metadata={
        "size": "dim", "help": "LSTM layers (the MLP always has 3 linears)."})
    encoder_dropout: float = field(default=0.0, metadata={"help": "LSTM dropout."})

    def __post_init__(self) -> None:
        super().__post_init__()
        kind = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        allowed = [e.value for e in PromptEncoderReparameterizationType]
        if kind not in allowed:
            raise ValueError(f"encoder_reparameterization_type={kind!r} is not one of {allowed}.")
