"""LoKr layers: dW = scaling * kron(W1, W2), each factor full or low rank (W2 also as a CP-factored
kernel)."""

from __future__ import annotations

import math

import torch

from .._shared.lycoris import Geometry, LycorisLayer, cp_weight


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split `dim` into (m, n) with m * n = dim, as LyCORIS / HF PEFT do.

    A positive `factor` dividing `dim` gives (factor, dim // factor) as is. Otherwise walk the divisors of
    `dim` upwards (at most `factor`, any when -1) until the pair stops being lopsided; the smaller number
    comes first."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    m, n = 1, dim
    for cand in range(2, dim + 1):
        if m >= n or cand > limit:
            break
        if dim % cand == 0:
            m, n = cand, dim // cand
    return min(m, n), max(m, n)


def kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Kronecker product of the factors, W1 first brought to W2's number of dims: trailing unit (kernel) dims
    next to a 4-D Conv2d-shaped W2, leading unit dims otherwise (torch.kron's rule, which HF PEFT 0.21.2
    relies on for a 3-D Conv1d W2; kept so files agree).

    Written out (block (i, j, ...) of the result is W1[i, j, ...] * W2) rather than via torch.kron, which
    fails on the strides einsum gives some CP-rebuilt kernels with a unit dim (HF PEFT 0.21.2 crashes
    there)."""
    pad = (1,) * (w2.dim() - w1.dim())
    w1 = w1.reshape(*w1.shape, *pad) if w2.dim() == 4 else w1.reshape(*pad, *w1.shape)
    spread1 = w1.reshape([s for n in w1.shape for s in (n, 1)])
    spread2 = w2.reshape([s for n in w2.shape for s in (1, n)])
    return (spread1 * spread2).reshape([m * n for m, n in zip(w1.shape, w2.shape)])


class LoKrLayer(LycorisLayer):
    # same attribute names as HF PEFT, so file keys match; order = HF's initialisation order
    adapter_param_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
                           "lokr_w2_b", "lokr_t2")
    adapter_layer_names = adapter_param_names  # HF PEFT's name (diffusers' layerwise casting reads it)
    ZERO_INIT = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), False: ()}

    def scales_rank_dropout(self, config) -> bool:
        return bool(config.rank_dropout_scale)

    def create_parameters(self, name: str, r: int, geo: Geometry, config) -> None:
        a, b = factorization(geo.out, config.decompose_factor)
        c, d = factorization(geo.inp, config.decompose_factor)
        if config.decompose_both and r < max(a, c) / 2:
            self.add_parameter("lokr_w1_a", name, a, r)
            self.add_parameter("lokr_w1_b", name, r, c)
        else:
            self.add_parameter("lokr_w1", name, a, c)
        if r >= max(b, d) / 2:
            self.add_parameter("lokr_w2", name, b, d, *geo.kernel)
        elif geo.effective:
            self.add_parameter("lokr_t2", name, r, r, *geo.cp_kernel)
            self.add_parameter("lokr_w2_a", name, r, b)
            self.add_parameter("lokr_w2_b", name, r, d)
        else:
            self.add_parameter("lokr_w2_a", name, b, r)
            self.add_parameter("lokr_w2_b", name, r, d * math.prod(geo.kernel))

    def _w1(self, name: str) -> torch.Tensor:
        if name in self.lokr_w1:
            return self.lokr_w1[name]
        return self.lokr_w1_a[name] @ self.lokr_w1_b[name]

    def _w2(self, name: str) -> torch.Tensor:
        if name in self.lokr_w2:
            return self.lokr_w2[name]
        if name in self.lokr_t2:
            return cp_weight(self.lokr_t2[name], self.lokr_w2_a[name], self.lokr_w2_b[name])
        return self.lokr_w2_a[name] @ self.lokr_w2_b[name]

    def full_delta(self, name: str) -> torch.Tensor:
        return kron(self._w1(name), self._w2(name)) * self.scaling[name]


class Linear(LoKrLayer):
    """LoKr on nn.Linear."""


class Conv1d(LoKrLayer):
    """LoKr on nn.Conv1d."""


class Conv2d(LoKrLayer):
    """LoKr on nn.Conv2d."""
