"""FourierFT layers (Gao et al., 2024, https://arxiv.org/abs/2405.03003) on linear and GPT-2 Conv1D layers.

Each adapter trains `n` coefficients placed at fixed random positions of an (out, in) spectrum; the weight
change is `scaling * Re(IFFT2(spectrum))`. Positions are not saved: they are redrawn from `random_loc_seed`
exactly as HF PEFT draws them (a seeded permutation of the flattened (out, in) grid), so the same seed gives
the same positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer
from .._shared.modules import is_conv1d, linear_dims


def spectral_locations(out_features: int, in_features: int, n: int, seed: int) -> torch.Tensor:
    """(2, n) long tensor of (row, column) spectrum positions: the first `n` of a permutation seeded by
    `seed`."""
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // in_features, flat % in_features], dim=0)


def check_sizes(n_frequency, seed, in_features: int, out_features: int) -> None:
    if not isinstance(n_frequency, int) or isinstance(n_frequency, bool) or n_frequency <= 0:
        raise ValueError(f"FourierFT n_frequency must be a positive integer, got {n_frequency!r}.")
    if n_frequency > in_features * out_features:
        raise ValueError(
            f"FourierFT n_frequency={n_frequency} exceeds the {out_features}x{in_features} = "
            f"{in_features * out_features} spectrum entries of this layer; lower n_frequency (or give this "
            "module a smaller value in n_frequency_pattern).")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"FourierFT random_loc_seed must be an integer seed, got {seed!r}.")


class FourierFTLinear(AdapterLayer):
    """`base(x) + x @ dW.T` with dW = scaling * Re(IFFT2(dense spectrum)), one spectrum per adapter."""

    adapter_param_names = ("fourierft_spectrum",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config,
                 n_frequency: int | None = None) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = linear_dims(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.fourierft_spectrum = nn.ParameterDict()
        self.fourierft_n_frequency: dict[str, int] = {}
        self.fourierft_scaling: dict[str, float] = {}
        self.fourierft_random_loc_seed: dict[str, int] = {}
        self.indices: dict[str, torch.Tensor] = {}
        self.update_layer(adapter_name, config, n_frequency=n_frequency)

    def update_layer(self, adapter_name: str, config, n_frequency: int | None = None, **kwargs) -> None:
        n = config.n_frequency if n_frequency is None else n_frequency
        check_sizes(n, config.random_loc_seed, self.in_features, self.out_features)
        self.fourierft_n_frequency[adapter_name] = n
        self.fourierft_random_loc_seed[adapter_name] = config.random_loc_seed
        self.fourierft_scaling[adapter_name] = config.scaling
        self.indices[adapter_name] = spectral_locations(self.out_features, self.in_features, n,
                                                        config.random_loc_seed)
        spectrum = torch.randn(n)  # drawn even for zero init, so the global RNG advances as in HF PEFT
        if config.init_weights:
            spectrum.zero_()
        self.fourierft_spectrum[adapter_name] = nn.Parameter(spectrum)

    def dense_delta(self, name: str) -> torch.Tensor:
        """The (out, in) weight change; the inverse FFT runs in float32 (no half-precision FFT everywhere)."""
        spectrum = self.fourierft_spectrum[name]
        rows, cols = self.indices[name].to(spectrum.device)
        dense = torch.zeros(self.out_features, self.in_features, device=spectrum.device)
        dense[rows, cols] = spectrum.float()
        return (torch.fft.ifft2(dense).real * self.fourierft_scaling[name]).to(spectrum.dtype)

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        delta = self.dense_delta(name)
        return F.linear(x.to(delta.dtype), delta)

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = self.dense_delta(name)
        return delta.T if self.fan_in_fan_out else delta
