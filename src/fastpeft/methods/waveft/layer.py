"""WaveFT layers (Bilican et al., 2025, https://arxiv.org/abs/2505.12532) on nn.Linear and GPT-2 Conv1D.

Each adapter trains `n` coefficients at fixed random positions of an (out, in) grid. With `use_idwt` the
grid is padded by the filter's reduction L - 2 (then to even sizes), the coefficients are placed centred in
it, its four quadrants are read as the sub-bands (cA top-left, cH top-right, cV bottom-left, cD
bottom-right) of a one-level 2-D wavelet decomposition, and the inverse transform (wavelets.py) gives the
weight change, centre-cropped back to (out, in) and scaled. Without it the grid itself is the change.
Positions are not saved: they are redrawn from `random_loc_seed` as HF PEFT draws them (a seeded
permutation of the flattened (out, in) grid).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer
from .._shared.modules import is_conv1d, linear_dims
from .wavelets import check_wavelet, inverse_dwt2, lowpass


def coefficient_positions(out_features: int, in_features: int, n: int, seed: int) -> torch.Tensor:
    """(2, n) long tensor of (row, column) positions: the first `n` of a permutation seeded by `seed`."""
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // in_features, flat % in_features], dim=0)


def check_n_frequency(n_frequency, key: str, in_features: int, out_features: int) -> None:
    """`n_frequency` must be a positive int no larger than the layer's (out, in) grid."""
    if not isinstance(n_frequency, int) or isinstance(n_frequency, bool) or n_frequency <= 0:
        raise ValueError(f"WaveFT n_frequency must be a positive integer, got {n_frequency!r} for layer "
                         f"'{key}'.")
    if n_frequency > in_features * out_features:
        raise ValueError(
            f"WaveFT n_frequency={n_frequency} exceeds the {out_features}x{in_features} = "
            f"{in_features * out_features} weight entries of layer '{key}'; lower n_frequency (or give this "
            "module a smaller value in n_frequency_pattern).")


def padded_size(features: int, wavelet: str) -> int:
    """Grid side before the inverse transform: the transform shortens each side by L - 2, so that much is
    added, then one more if odd (the sub-bands split the grid in halves)."""
    size = features + len(lowpass(wavelet)) - 2
    return size + size % 2


class WaveFTLinear(AdapterLayer):
    """`base(x) + x @ dW.T`, dW = scaling * IDWT2(sparse coefficients), one set per adapter."""

    adapter_param_names = ("waveft_spectrum",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, n_frequency: int | None = None,
                 target_name: str = "") -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = linear_dims(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.waveft_spectrum = nn.ParameterDict()
        self.waveft_n_frequency: dict[str, int] = {}
        self.waveft_scaling: dict[str, float] = {}
        self.waveft_random_loc_seed: dict[str, int] = {}
        self.waveft_wavelet_family: dict[str, str] = {}
        self.waveft_use_idwt: dict[str, bool] = {}
        self.waveft_indices: dict[str, torch.Tensor] = {}
        self.update_layer(adapter_name, config, n_frequency=n_frequency, target_name=target_name)

    def update_layer(self, adapter_name: str, config, n_frequency: int | None = None, target_name: str = "",
                     **kwargs) -> None:
        n = config.n_frequency if n_frequency is None else n_frequency
        check_n_frequency(n, target_name, self.in_features, self.out_features)
        check_wavelet(config.wavelet_family)
        self.waveft_n_frequency[adapter_name] = n
        self.waveft_random_loc_seed[adapter_name] = config.random_loc_seed
        self.waveft_wavelet_family[adapter_name] = config.wavelet_family
        self.waveft_use_idwt[adapter_name] = config.use_idwt
        self.waveft_scaling[adapter_name] = config.scaling
        self.waveft_indices[adapter_name] = coefficient_positions(
            self.out_features, self.in_features, n, config.random_loc_seed)
        # zero init draws nothing from the global RNG, the random one N(0, 1) * 0.01, as HF PEFT
        values = torch.zeros(n) if config.init_weights else torch.randn(n) * 0.01
        self.waveft_spectrum[adapter_name] = nn.Parameter(values)

    def dense_delta(self, name: str) -> torch.Tensor:
        """The (out, in) weight change, in the coefficients' dtype."""
        values = self.waveft_spectrum[name]
        rows, cols = self.waveft_indices[name].to(values.device)
        out_f, in_f = self.out_features, self.in_features
        if not self.waveft_use_idwt[name]:
            grid = values.new_zeros(out_f, in_f)
            grid[rows, cols] = values
            return grid * self.waveft_scaling[name]
        wavelet = self.waveft_wavelet_family[name]
        height, width = padded_size(out_f, wavelet), padded_size(in_f, wavelet)
        grid = values.new_zeros(height, width)
        grid[rows + (height - out_f) // 2, cols + (width - in_f) // 2] = values
        h2, w2 = height // 2, width // 2
        delta = inverse_dwt2(grid[:h2, :w2], grid[:h2, w2:], grid[h2:, :w2], grid[h2:, w2:], wavelet)
        delta = delta * self.waveft_scaling[name]
        # (height + 2 - L, width + 2 - L): one row / column more than (out, in) where padding made it even
        top, left = (delta.shape[0] - out_f) // 2, (delta.shape[1] - in_f) // 2
        return delta[top:top + out_f, left:left + in_f]

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        delta = self.dense_delta(name)
        return F.linear(self.cast_input(x, delta.dtype), delta)

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = self.dense_delta(name)
        return delta.T if self.fan_in_fan_out else delta
