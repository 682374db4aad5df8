"""`BeftConfig`: HF PEFT 0.21's fields and defaults for BEFT, bias-efficient fine-tuning (Huang et al.,
2025)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig
from .._shared.common import lists_to_sets


@dataclass
class BeftConfig(PeftConfig):
    """Add a trained bias vector to the output of each targeted nn.Linear, by default the attention's value
    projections (https://arxiv.org/abs/2509.15974)."""

    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "nn.Linear modules to adapt: names, a full-match regex or 'all-linear'; default: the model "
                "type's value projection."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: the added biases start at zero (no change); False: N(0, 1) values (discouraged)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        lists_to_sets(self, ("target_modules",))
