"""`LilyConfig`: HF PEFT 0.21's fields and defaults for Lily, low-rank interconnected adaptation across
layers (https://arxiv.org/abs/2407.09946)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig
from .._shared.common import check_layer_selection, check_positive_ints, lists_to_sets


@dataclass
class LilyConfig(PeftConfig):
    """Per target: A (in -> r) shared by every `stride_A` consecutive layers, and `num_B` up-projections (r ->
    out) shared by all layers of that target, mixed by a router (https://arxiv.org/abs/2407.09946)."""

    r: int = field(default=32, metadata={
        "size": "dim",
        "help": "Rank: width of the low-rank hidden state (each A maps in -> r, each B r -> out). Lily has "
                "fewer adapters than LoRA, so a larger r (2-4x a LoRA rank) is usual."})
    stride_A: int = field(default=1, metadata={
        "help": "How many consecutive layers of one target share an A (1: each layer has its own). Sharing "
                "happens per target name (and weight shape), never across targets."})
    num_B: int = field(default=2, metadata={
        "size": "dim",
        "help": "Number of B matrices shared by all layers of a target; a router mixes them with softmax "
                "weights averaged over the batch's tokens. At least 2, so that the router trains."})
    scaling: float = field(default=1.0, metadata={
        "help": "Multiplier of the adapter's output (no alpha / r): sweep it on a log scale, 1.0 to start."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "nn.Linear modules to adapt: names (or dotted suffixes), a full-match regex or 'all-linear'; "
                "default: the model type's attention projections."})
    exclude_modules: list[str] | str | None = field(default=None,
                                                    metadata={"help": "Names or regex to skip."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})
    layers_to_transform: list[int] | int | None = field(default=None,
                                                        metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: B starts at zero (the adapter adds nothing at first); False: B Kaiming-uniform too."})

    def __post_init__(self) -> None:
        super().__post_init__()
        lists_to_sets(self)
        check_layer_selection(self, "LilyConfig")
        check_positive_ints(self, "LilyConfig", ("r",))
        if self.stride_A < 1:
            raise ValueError(f"LilyConfig.stride_A must be at least 1, got {self.stride_A!r}.")
        if self.num_B < 2:
            raise ValueError(f"LilyConfig.num_B must be at least 2 (the router mixes the B matrices and "
                             f"needs two to train), got {self.num_B!r}.")
