"""`LoKrConfig`: HF PEFT 0.21.2's LoKr fields and defaults (shared LyCORIS ones in ../_shared/lycoris.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .._shared.lycoris import LycorisConfig


@dataclass
class LoKrConfig(LycorisConfig):
    """Low-rank Kronecker product (LyCORIS, Yeh et al., 2023, https://arxiv.org/abs/2309.14859):
    dW = (alpha / r) * kron(W1, W2), W1 (a, c) and W2 (b, d[, kernel]) with out = a * b, in = c * d; either
    factor may itself be low rank (W2 when r < max(b, d) / 2, W1 too with `decompose_both`)."""

    init_weights: bool | Literal["lycoris"] = field(
        default=True, metadata={
            "help": "True: W1 starts at zero (dW = 0); 'lycoris': W2 (or W2b) starts at zero "
                    "instead, as in the LyCORIS repository; False: all factors random."})
    decompose_both: bool = field(
        default=False, metadata={"help": "Also factor W1 as W1a @ W1b when r < max(a, c) / 2."})
    decompose_factor: int = field(
        default=-1, metadata={
            "size": "dim",
            "help": "Preferred size of the first Kronecker factor; -1: as square as possible."})
    rank_dropout_scale: bool = field(
        default=False, metadata={"help": "Divide the rank-dropout mask by its mean during training."})

    INIT_CHOICES = (True, False, "lycoris")

    def __post_init__(self) -> None:
        super().__post_init__()
        factor = self.decompose_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or (factor != -1 and factor < 1):
            raise ValueError(f"LoKrConfig.decompose_factor must be -1 (automatic) or a positive integer, "
                             f"got {factor!r}.")
