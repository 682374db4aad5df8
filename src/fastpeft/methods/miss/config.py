"""`MissConfig`: HF PEFT 0.21's fields and defaults for MiSS (formerly Bone; Kang & Yin, 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...config import PeftConfig
from .._shared.common import BIAS_HELP, check_layer_options, check_positive_ints


@dataclass
class MissConfig(PeftConfig):
    """Matrix shard sharing: one small trainable block shared by every r-column shard of a weight
    (https://arxiv.org/abs/2409.15371)."""

    r: int = field(default=64, metadata={
        "size": "dim",
        "help": "Shard width along in_features (at most in_features of every targeted layer)."})
    miss_dropout: float = field(default=0.0,
                                metadata={"help": "Dropout on the MiSS input (not used by 'bat')."})
    mini_r: int = field(default=1, metadata={
        "size": "dim",
        "help": "init_weights='mini' only: width of the block along out_features "
                "(out_features % mini_r == 0)."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "nn.Linear modules to adapt: names, a full-match regex or 'all-linear'; default: the model "
                "type's attention projections."})
    exclude_modules: list[str] | str | None = field(default=None,
                                                    metadata={"help": "Names or regex to skip."})
    init_weights: bool | Literal["bat", "mini"] = field(default=True, metadata={
        "help": "True: MiSS (balance), block (r, out) starting at zero; 'bat': per-block W_ij B_i + B_i "
                "update (in and out divisible by r); 'mini': block (r, mini_r) repeated along out; "
                "False: random block."})
    layers_to_transform: list[int] | int | None = field(default=None,
                                                        metadata={"help": "Layer indices to adapt."})
    layers_pattern: str | None = field(default=None, metadata={"help": "Name of the layer list."})
    bias: str = field(default="none",
                      metadata={"help": f"Biases trained too: {BIAS_HELP}, e.g. 'MiSS_only'."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "MissConfig", ("r", "mini_r"))
        if not (isinstance(self.init_weights, bool) or self.init_weights in ("bat", "mini")):
            raise ValueError(f"MissConfig.init_weights={self.init_weights!r} is not valid; use True, False, "
                             "'bat' or 'mini'.")
        if not 0.0 <= self.miss_dropout < 1.0:
            raise ValueError(f"MissConfig.miss_dropout must be in [0, 1), got {self.miss_dropout!r}.")
        check_layer_options(self, "MissConfig")
