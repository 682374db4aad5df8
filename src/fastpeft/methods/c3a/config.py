"""`C3AConfig`: HF PEFT 0.21's fields and defaults for C3A, circular convolution adaptation (Chen et al.,
2024)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...config import PeftConfig
from .._shared.common import BIAS_HELP, check_positive_ints, lists_to_sets

INIT_CHOICES = (True, False, "gaussian", "kaiming_uniform", "xavier_uniform")


@dataclass
class C3AConfig(PeftConfig):
    """Add a block-circulant matrix to each targeted weight (https://arxiv.org/abs/2407.19342).

    A (out, in) layer gets (out / block_size) x (in / block_size) kernels of length `block_size`; each kernel
    is the first row of one circulant block, so a layer trains in * out / block_size numbers.
    """

    block_size: int = field(default=256, metadata={
        "size": "dim",
        "help": "Length of each circulant kernel; must divide the in and out sizes of every adapted layer "
                "(larger: fewer parameters). The gcd of those sizes always fits."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "nn.Linear modules to adapt: names (or dotted suffixes), a full-match regex or 'all-linear'; "
                "default: the model type's attention projections."})
    bias: str = field(default="none", metadata={"help": f"Biases trained too: {BIAS_HELP}, e.g. 'c3a_only'."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})
    layers_to_transform: list[int] | int | None = field(default=None,
                                                        metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    block_size_pattern: dict | None = field(default_factory=dict, metadata={
        "size": "dim_values", "keys": "modules",
        "help": "Module name (or dotted suffix regex) -> block_size for layers that differ from block_size."})
    init_weights: bool | Literal["gaussian", "kaiming_uniform", "xavier_uniform"] | None = field(
        default="xavier_uniform", metadata={
            "help": "Kernel init: 'xavier_uniform' (default; False means the same), 'kaiming_uniform', "
                    "'gaussian', or True for zeros (the adapter starts as a no-op)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        lists_to_sets(self, ("target_modules",))
        self.block_size_pattern = self.block_size_pattern or {}
        check_positive_ints(self, "C3AConfig", ("block_size",))
        if isinstance(self.target_modules, str):
            for option in ("layers_to_transform", "layers_pattern"):
                if getattr(self, option) is not None:
                    raise ValueError(f"C3AConfig: {option} cannot be used when target_modules is a regex "
                                     "string; give target_modules as a list of names.")
        bias = self.bias
        if not isinstance(bias, str) or not (bias in ("none", "all") or bias.endswith("_only")):
            raise ValueError(f"C3AConfig.bias={self.bias!r} is not valid; use {BIAS_HELP}.")
        if not any(self.init_weights is c or (isinstance(c, str) and self.init_weights == c)
                   for c in INIT_CHOICES):
            raise ValueError(f"C3AConfig.init_weights must be one of {list(INIT_CHOICES)}, "
                             f"got {self.init_weights!r}.")
        if not isinstance(self.block_size_pattern, dict):
            raise ValueError("C3AConfig.block_size_pattern must be a dict {module regex: block_size}, got "
                             f"{self.block_size_pattern!r}.")
