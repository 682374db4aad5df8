"""`GloraConfig`: HF PEFT 0.21's fields and defaults for GLoRA, generalised LoRA
(https://arxiv.org/abs/2306.07967)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...config import PeftConfig
from .._shared.common import BIAS_HELP, check_choice, check_positive_ints, lists_to_sets

# what each support can hold: A / B are (out, in) matrices, C an (in, 1) column, D / E bias-sized vectors
A_B_FORMS = ("lora", "vector", "constant", "none")
C_FORMS = ("lora", "vector", "none")
D_E_FORMS = ("vector", "constant", "none")


@dataclass
class GloraConfig(PeftConfig):
    """W' = W0 + W0 * A + B and b' = b0 + b0 * D + E + W0 @ C (elementwise *), each of A..E a low-rank
    product, a vector, a constant or nothing (https://arxiv.org/abs/2306.07967)."""

    r: int = field(default=8, metadata={
        "size": "dim", "help": "Rank of the low-rank products (used by the supports set to 'lora')."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "nn.Linear modules to adapt: names (or dotted suffixes), a full-match regex or 'all-linear'; "
                "default: the model type's attention projections."})
    bias: str = field(default="none",
                      metadata={"help": f"Biases trained too: {BIAS_HELP}, e.g. 'glora_only'."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})
    config_A_B: Literal["lora", "vector", "constant", "none"] = field(default="lora", metadata={
        "help": "Form of A (scales W0 elementwise) and B (added to W0): 'lora' Xd (out, r) @ Xu (r, in), "
                "'vector' one value per output row, 'constant' one scalar, 'none' zeros (nothing trained)."})
    config_C: Literal["lora", "vector", "none"] = field(default="lora", metadata={
        "help": "Form of C, the (in, 1) column mapping W0 into the bias (b += W0 @ C): 'lora' Xd (in, r) @ "
                "Xu (r, 1), 'vector' one (in, 1) column, 'none' zeros. Only on layers with a bias."})
    config_D_E: Literal["vector", "constant", "none"] = field(default="constant", metadata={
        "help": "Form of D (scales b0) and E (added to b0): 'vector' one value per output, 'constant' one "
                "scalar, 'none' zeros. Only on layers with a bias."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: the adapter starts as the identity (zero Xd, vectors and scalars); False: Kaiming-"
                "uniform Xd and vectors, N(0, 0.02) scalars."})

    def __post_init__(self) -> None:
        super().__post_init__()
        lists_to_sets(self, ("target_modules",))
        check_positive_ints(self, "GloraConfig", ("r",))
        check_choice("GloraConfig", "config_A_B", self.config_A_B, A_B_FORMS)
        check_choice("GloraConfig", "config_C", self.config_C, C_FORMS)
        check_choice("GloraConfig", "config_D_E", self.config_D_E, D_E_FORMS)
        bias = self.bias
        if not isinstance(bias, str) or not (bias in ("none", "all") or bias.endswith("_only")):
            raise ValueError(f"GloraConfig.bias={self.bias!r} is not valid; use {BIAS_HELP}.")
