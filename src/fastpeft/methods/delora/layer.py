"""DeLoRA layers: a rank-r update with a trained bound on its norm, decoupled from the update's direction.

Bini et al., "Decoupling Angles and Strength in Low-rank Adaptation" (https://arxiv.org/abs/2503.18225). For
a (out, in) weight W with column norms w = |W[:, j]| (frozen when the adapter is created and saved with it),
A (r, in), B (out, r) and a trained scalar lambda, the update is

    dW = B diag(lambda / r / (|a_i| |b_i|)) A diag(w),

a_i the rows of A and b_i the columns of B (norms clamped at 1e-4). Each rank-1 term has unit norm before the
lambda / r factor, so |dW| <= lambda * max|w|: lambda alone sets how far the model moves.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer
from .._shared.random_projections import BufferDict

NORM_FLOOR = 1e-4  # as HF PEFT: no division by a vanishing row / column norm


class DeloraLinear(AdapterLayer):
    """`base(x) + B (s * (A (dropout(x) * w)))` with s = lambda / r / (|a_i| |b_i|), on an nn.Linear."""

    adapter_param_names = ("delora_A", "delora_B", "delora_lambda")

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config, r: int | None = None,
                 delora_lambda: float | None = None, target_name: str = "an nn.Linear", **kwargs) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.target_name = target_name
        self.delora_A = nn.ParameterDict()
        self.delora_B = nn.ParameterDict()
        self.delora_lambda = nn.ParameterDict()
        self.delora_dropout = nn.ModuleDict()
        self.delora_w_norm = BufferDict(persistent=True)  # saved in files (key delora_w_norm)
        self.r: dict[str, int] = {}
        self.update_layer(adapter_name, config, r=r, delora_lambda=delora_lambda)

    def update_layer(self, adapter_name: str, config, r: int | None = None,
                     delora_lambda: float | None = None, **kwargs) -> None:
        r = config.r if r is None else r
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"DeLoRA r must be a positive integer, got {r!r} for '{self.target_name}' "
                             "(r or its rank_pattern entry).")
        bound = config.delora_lambda if delora_lambda is None else delora_lambda
        self.r[adapter_name] = r
        a, b = torch.empty(r, self.in_features), torch.empty(self.out_features, r)
        # the global RNG in HF PEFT's order (A, then B): the same seed gives the same factors
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(b)
        else:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        self.delora_A[adapter_name] = nn.Parameter(a)
        self.delora_B[adapter_name] = nn.Parameter(b)
        self.delora_lambda[adapter_name] = nn.Parameter(torch.full((1,), float(bound)))
        p = config.module_dropout
        self.delora_dropout[adapter_name] = nn.Dropout(p=p) if p > 0 else nn.Identity()
        self.delora_w_norm[adapter_name] = self._column_norms()

    @torch.no_grad()
    def _column_norms(self) -> torch.Tensor:
        """(in,) norms of the base weight's columns, in its dtype and on its device (ones on the meta device:
        a load brings the saved values)."""
        weight = self.base_layer.weight
        if weight.is_meta:
            return torch.ones(weight.shape[1], device=weight.device)
        return weight.detach().norm(dim=0)

    def adapter_tensors(self, name: str):
        yield from self.adapter_parameters(name)
        if name in self.delora_w_norm:
            yield f"delora_w_norm.{name}", self.delora_w_norm[name]

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        if name in self.delora_w_norm:
            del self.delora_w_norm[name]

    def _rank_scales(self, name: str) -> torch.Tensor:
        """(r,) lambda / r / (|a_i| |b_i|)."""
        a, b = self.delora_A[name], self.delora_B[name]
        a_norm = a.norm(dim=1).clamp(min=NORM_FLOOR)
        b_norm = b.norm(dim=0).clamp(min=NORM_FLOOR)
        return self.delora_lambda[name] / self.r[name] / (a_norm * b_norm)

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        a = self.delora_A[name]
        x = self.cast_input(self.delora_dropout[name](x), a.dtype)
        h = F.linear(x * self.delora_w_norm[name].to(x.dtype), a)  # (..., r)
        return F.linear(h * self._rank_scales(name), self.delora_B[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        """(out, in): B diag(s) A, column j scaled by w_j."""
        delta = (self.delora_B[name] * self._rank_scales(name)) @ self.delora_A[name]
        return delta * self.delora_w_norm[name]
