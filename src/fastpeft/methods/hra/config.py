"""`HRAConfig`: HF PEFT 0.21's fields and defaults for Householder reflection adaptation (Yuan et al.,
2024)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig
from .._shared.common import BIAS_HELP, check_layer_options, check_positive_ints


@dataclass
class HRAConfig(PeftConfig):
    """Multiply each targeted weight by a chain of `r` Householder reflections
    (https://arxiv.org/abs/2405.17484)."""

    r: int = field(default=8, metadata={
        "size": "dim",
        "help": "Number of Householder reflections per layer; use an even number so init_weights=True starts "
                "at the identity."})
    apply_GS: bool = field(default=False, metadata={
        "help": "Orthonormalise the reflection vectors (Gram-Schmidt) and use I - 2 U U^T."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "nn.Linear / nn.Conv2d modules to adapt: names, a full-match regex or 'all-linear'; default: "
                "the model type's attention projections."})
    exclude_modules: list[str] | str | None = field(default=None,
                                                    metadata={"help": "Names or regex to skip."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: pairs of equal vectors (the product is the identity); False: random vectors."})
    layers_to_transform: list[int] | int | None = field(default=None,
                                                        metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    bias: str = field(default="none", metadata={"help": f"Biases trained too: {BIAS_HELP}, e.g. 'hra_only'."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "HRAConfig", ("r",))
        check_layer_options(self, "HRAConfig")
