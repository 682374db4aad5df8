"""RandLoRA layer (Albert et al., 2025, https://arxiv.org/abs/2502.00987) for nn.Linear and transformers'
Conv1D.

The shared bases are A: (r, 1, d_min) and B: (d_max, n, r) (_shared/random_projections.py). A layer with
d = min(in, out), D = max(in, out) uses n_l = ceil(d / r) bases and trains lambda: (r, n_l) and gamma: (n_l,
d):

    S = (lambda[:, :, None] * A[:, :, :d] * gamma[None]).reshape(r * n_l, d)   (the scaled small side)
    L = B[:D, :n_l].reshape(D, n_l * r)                                         (the large side)
    delta_W = (alpha / r) * (L @ S  if d == in  else  S.T @ L.T)                (out, in)

The two factors are flattened in different orders (rank-major vs basis-major), as HF PEFT does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._shared.random_projections import ProjectionLayer


def num_bases(min_dim: int, r: int) -> int:
    """Bases needed for a full-rank update of a layer whose smaller side is `min_dim`: ceil(min_dim / r)."""
    return -(-min_dim // r)


class RandLoraLinear(ProjectionLayer):
    adapter_param_names = ("randlora_lambda", "randlora_gamma")
    projection_names = ("randlora_A", "randlora_B")
    method_label = "RandLoRA"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, projections,
                 fan_in_fan_out: bool = False):
        super().__init__(base_layer, projections, fan_in_fan_out)
        self.scaling: dict[str, float] = {}
        self.num_bases: dict[str, int] = {}
        self.randlora_dropout = nn.ModuleDict()
        self.randlora_lambda = nn.ParameterDict()
        self.randlora_gamma = nn.ParameterDict()
        self.update_layer(adapter_name, config, projections=projections, fan_in_fan_out=fan_in_fan_out)

    @property
    def min_max(self) -> tuple[int, int]:
        return min(self.in_features, self.out_features), max(self.in_features, self.out_features)

    def update_layer(self, adapter_name: str, config, projections=None, fan_in_fan_out: bool = False,
                     **kwargs) -> None:
        if projections is not None:
            self.share_projections(projections)
        low, high = self.min_max
        n = num_bases(low, config.r)
        a, b = self.shared(adapter_name)
        self.check_fits(adapter_name, {"randlora_A": (2, low, a.shape[-1]),
                                       "randlora_B": (0, high, b.shape[0])})
        self.r[adapter_name], self.num_bases[adapter_name] = config.r, n
        self.scaling[adapter_name] = config.randlora_alpha / config.r
        p = config.randlora_dropout
        self.randlora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.randlora_lambda[adapter_name] = nn.Parameter(torch.randn(config.r, n))
        self.randlora_gamma[adapter_name] = nn.Parameter(torch.ones(n, low) / high)
        if config.init_weights:  # lambda = 0: a no-op; gamma = 1 / (its larger side), as HF PEFT
            with torch.no_grad():
                self.randlora_lambda[adapter_name].zero_()
                self.randlora_gamma[adapter_name].fill_(1 / max(n, low))

    def factors(self, name: str, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) with delta_W = scaling * up @ down: down (k, in), up (out, k)."""
        low, high = self.min_max
        n = self.num_bases[name]
        a, b = self.shared(name)
        a = a[:, :n, :low].to(device=device, dtype=dtype)
        b = b[:high, :n, :].to(device=device, dtype=dtype)
        lam = self.randlora_lambda[name].to(device=device, dtype=dtype)
        gamma = self.randlora_gamma[name].to(device=device, dtype=dtype)
        small = (lam[:, :, None] * a * gamma[None]).flatten(0, 1)  # (r * n, low)
        large = b.flatten(1)  # (high, n * r)
        if low == self.in_features:
            return small, large
        return large.T, small.T

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        dtype = self.randlora_lambda[name].dtype
        down, up = self.factors(name, dtype, x.device)
        h = F.linear(self.randlora_dropout[name](x.to(dtype)), down)
        return F.linear(h, up) * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        lam = self.randlora_lambda[name]
        half_cpu = lam.device.type == "cpu" and lam.dtype in (torch.float16, torch.bfloat16)
        down, up = self.factors(name, torch.float32 if half_cpu else lam.dtype, lam.device)
        delta = up @ down
        delta = delta.T if self.fan_in_fan_out else delta
        return (delta * self.scaling[name]).to(lam.dtype)
