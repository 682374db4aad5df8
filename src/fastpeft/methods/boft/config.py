"""`BOFTConfig`: the fields and defaults of HF PEFT 0.21.2's BOFT config (all of them, so files
round-trip)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig
from .._shared.common import check_block_choice, check_choice, check_layer_selection, lists_to_sets

BOFT_BIAS_VALUES = ("none", "all", "boft_only")


@dataclass
class BOFTConfig(PeftConfig):
    """Butterfly Orthogonal Finetuning (Liu et al., 2024, https://arxiv.org/abs/2311.06243): the layer input
    is rotated by a product of permuted block-diagonal orthogonal factors and the output is rescaled per
    channel."""

    boft_block_size: int = field(default=4, metadata={
        "size": "dim",
        "help": "Size of each block; give either boft_block_size or boft_block_num (the other must be 0)."})
    boft_block_num: int = field(default=0, metadata={
        "size": "dim",
        "help": "Blocks per factor; boft_block_size x boft_block_num = the layer's input size."})
    boft_n_butterfly_factor: int = field(default=1, metadata={
        "size": "dim",
        "help": "Butterfly factors multiplied into the rotation. Kept in the config, but new adapters get "
                "one factor as in HF PEFT without its fbd_cuda extension; files holding N "
                "factors load with all N."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Names, regex or 'all-linear'; default from the model type."})
    exclude_modules: list[str] | str | None = field(default=None,
                                                    metadata={"help": "Names or regex to skip."})
    boft_dropout: float = field(default=0.0, metadata={
        "help": "Training only: probability of replacing blocks of one random factor by the identity."})
    fan_in_fan_out: bool = field(default=False,
                                 metadata={"help": "Weights stored (in, out); False for nn.Linear."})
    bias: str = field(default="none", metadata={
        "help": "Which base biases train: 'none', 'all' or 'boft_only' (those of adapted layers)."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: identity rotation and unit scale at start; False: random (std 0.1), for tests."})
    layers_to_transform: list[int] | int | None = field(default=None,
                                                        metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})

    def __post_init__(self) -> None:
        super().__post_init__()
        lists_to_sets(self)
        check_layer_selection(self, "BOFTConfig")
        check_block_choice("BOFTConfig", "boft_block_num", self.boft_block_num, "boft_block_size",
                           self.boft_block_size)
        check_choice("BOFTConfig", "bias", self.bias, BOFT_BIAS_VALUES)
        if self.boft_n_butterfly_factor < 1:
            raise ValueError(
                f"BOFTConfig.boft_n_butterfly_factor={self.boft_n_butterfly_factor} must be >= 1.")
        if not 0.0 <= self.boft_dropout < 1.0:
            raise ValueError(f"BOFTConfig.boft_dropout={self.boft_dropout} must be in [0, 1).")
