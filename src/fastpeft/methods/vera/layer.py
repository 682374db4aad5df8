"""VeRA layer (Kopiczko et al., 2023, https://arxiv.org/abs/2310.11454) for nn.Linear and transformers'
Conv1D.

delta_W = diag(lambda_b) @ B[:out] @ diag(lambda_d) @ A[:, :in], where A: (r, in_max) and B: (out_max, r) are
the model's shared frozen random matrices (_shared/random_projections.py); lambda_b: (out,) and lambda_d: (r,)
train.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._shared.random_projections import ProjectionLayer


def _half_on_cpu(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16)


class VeraLinear(ProjectionLayer):
    adapter_param_names = ("vera_lambda_b", "vera_lambda_d")
    projection_names = ("vera_A", "vera_B")
    method_label = "VeRA"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, projections,
                 fan_in_fan_out: bool = False):
        super().__init__(base_layer, projections, fan_in_fan_out)
        self.vera_dropout = nn.ModuleDict()
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.update_layer(adapter_name, config, projections=projections, fan_in_fan_out=fan_in_fan_out)

    def update_layer(self, adapter_name: str, config, projections=None, fan_in_fan_out: bool = False,
                     **kwargs) -> None:
        if projections is not None:
            self.share_projections(projections)
        a, b = self.shared(adapter_name)
        self.check_fits(adapter_name, {"vera_A": (1, self.in_features, a.shape[1]),
                                       "vera_B": (0, self.out_features, b.shape[0])})
        self.r[adapter_name] = config.r
        self.vera_dropout[adapter_name] = (nn.Dropout(config.vera_dropout) if config.vera_dropout > 0
                                           else nn.Identity())
        # drawn as HF PEFT does (ones / standard normal) before the optional no-op init below
        self.vera_lambda_b[adapter_name] = nn.Parameter(torch.ones(self.out_features))
        self.vera_lambda_d[adapter_name] = nn.Parameter(torch.randn(config.r))
        if config.init_weights:
            with torch.no_grad():
                self.vera_lambda_d[adapter_name].fill_(config.d_initial)
                self.vera_lambda_b[adapter_name].zero_()

    def sliced(self, name: str, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The parts of the shared A / B this layer uses: A[:, :in] and B[:out]."""
        a, b = self.shared(name)
        return (a[:, : self.in_features].to(device=device, dtype=dtype),
                b[: self.out_features].to(device=device, dtype=dtype))

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        lambda_d, lambda_b = self.vera_lambda_d[name], self.vera_lambda_b[name]
        a, b = self.sliced(name, lambda_d.dtype, x.device)
        h = F.linear(self.vera_dropout[name](x.to(lambda_d.dtype)), a)
        return lambda_b * F.linear(lambda_d * h, b)

    def delta_weight(self, name: str) -> torch.Tensor:
        lambda_d, lambda_b = self.vera_lambda_d[name], self.vera_lambda_b[name]
        dtype = torch.float32 if _half_on_cpu(lambda_d) else lambda_d.dtype  # slow half matmuls on CPU
        a, b = self.sliced(name, dtype, lambda_d.device)
        delta = (lambda_b.to(dtype)[:, None] * b) @ (lambda_d.to(dtype)[:, None] * a)
        delta = delta.T if self.fan_in_fan_out else delta
        return delta.to(lambda_d.dtype)
