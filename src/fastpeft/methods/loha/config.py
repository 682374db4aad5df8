"""`LoHaConfig`: HF PEFT 0.21.2's LoHa fields and defaults (shared LyCORIS ones in ../_shared/lycoris.py)."""

from __future__ import annotations

from dataclasses import dataclass

from .._shared.lycoris import LycorisConfig


@dataclass
class LoHaConfig(LycorisConfig):
    """Low-rank Hadamard product (FedPara, Hyeon-Woo et al., 2021, https://arxiv.org/abs/2108.06098):
    dW = (alpha / r) * (W1a @ W1b) * (W2a @ W2b), elementwise product of two rank-r matrices (rank up to r^2).

    `rank_dropout` rescales the kept rows by 1 / mean(mask) (as HF PEFT; LoHa has no `rank_dropout_scale`)."""
