"""The five supports of a GLoRA layer (A, B, C, D, E), each a small module whose call gives its value.

Parameter names and shapes are HF PEFT 0.21's (they are the file keys): a low-rank product `Xd` @ `Xu`, a
vector or a one-element scalar `X`, or a `zeros` buffer (saved in files, never trained). The inits draw from
the global RNG in HF PEFT's order, so one seed gives the same tensors.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _kaiming(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class LowRank(nn.Module):
    """Value Xd @ Xu: (rows, r) @ (r, cols). Xu is always drawn; Xd starts at zero (identity) or drawn."""

    def __init__(self, rows: int, cols: int, r: int, init_weights: bool) -> None:
        super().__init__()
        self.Xd = nn.Parameter(torch.zeros(rows, r))
        self.Xu = nn.Parameter(torch.zeros(r, cols))
        _kaiming(self.Xu)
        if init_weights:
            nn.init.zeros_(self.Xd)
        else:
            _kaiming(self.Xd)

    def forward(self) -> torch.Tensor:
        return self.Xd @ self.Xu


class Vector(nn.Module):
    """Value X: (n, 1) as a column (broadcast over a matrix's columns) or (n,) for a bias."""

    def __init__(self, n: int, column: bool, init_weights: bool) -> None:
        super().__init__()
        self.X = nn.Parameter(torch.zeros((n, 1) if column else (n,)))
        if not init_weights:  # a (n,) vector is drawn as one (1, n) row: fan_in n
            _kaiming(self.X if column else self.X.unsqueeze(0))

    def forward(self) -> torch.Tensor:
        return self.X


class Scalar(nn.Module):
    """Value X[0], one trained number shared by every entry."""

    def __init__(self, init_weights: bool) -> None:
        super().__init__()
        self.X = nn.Parameter(torch.zeros(1))
        if not init_weights:
            nn.init.normal_(self.X, mean=0.0, std=0.02)

    def forward(self) -> torch.Tensor:
        return self.X[0]


class Zeros(nn.Module):
    """Value 0 with the support's shape, as a buffer HF PEFT stores in adapter files."""

    def __init__(self, shape: tuple[int, ...], like: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("zeros", torch.zeros(shape, device=like.device, dtype=like.dtype))

    def forward(self) -> torch.Tensor:
        return self.zeros


def weight_support(form: str, out_f: int, in_f: int, r: int, init: bool, like: torch.Tensor) -> nn.Module:
    """A or B, broadcastable to the (out, in) weight."""
    if form == "lora":
        return LowRank(out_f, in_f, r, init)
    if form == "vector":
        return Vector(out_f, True, init)
    if form == "constant":
        return Scalar(init)
    return Zeros((out_f, in_f), like)


def column_support(form: str, in_f: int, r: int, init: bool, has_bias: bool, like: torch.Tensor) -> nn.Module:
    """C, an (in, 1) column (zeros on layers without a bias)."""
    if has_bias and form == "lora":
        return LowRank(in_f, 1, r, init)
    if has_bias and form == "vector":
        return Vector(in_f, True, init)
    return Zeros((in_f, 1), like)


def bias_support(form: str, out_f: int, init: bool, has_bias: bool, like: torch.Tensor) -> nn.Module:
    """D or E, broadcastable to the (out,) bias (zeros on layers without a bias)."""
    if has_bias and form == "vector":
        return Vector(out_f, False, init)
    if has_bias and form == "constant":
        return Scalar(init)
    return Zeros((out_f,), like)
