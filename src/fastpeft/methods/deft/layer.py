"""DEFT layers on nn.Linear and transformers' Conv1D ("decompositional efficient fine-tuning").

For a base weight W (out, in) in its logical (out, in) layout, a trained direction P (out, r) and injection
R (r, in), the adapted weight is

    W' = (I - Q right^T) W + s Q R,    i.e.    delta = Q (s R - right^T W),

with Q = P, right = relu(P) ('relu': a non-orthogonal projector) or Q = right = the orthonormal QR factor of
P ('qr'), and s = alpha / r (1 without alpha). PaRa (`para=True`) keeps only the removal term -Q right^T W.
The forward never builds W': it takes the removal from the base output, (x W^T right) Q^T, so a layer costs
two rank-r products more than its base. Everything is computed in float32, as HF PEFT does (QR is unreliable
in half precision).

Merging is not invertible from the merged weight alone (I - P_proj is singular), so a merge keeps the
(r, in) factor right^T W of the weight it merged into and unmerge subtracts exactly what merge added.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer
from .._shared.modules import is_conv1d, linear_dims
from .._shared.random_projections import BufferDict

INIT_STD = 0.02  # std of P's init and (times init_scale) of R's random init, as HF PEFT


class DeftLinear(AdapterLayer):
    """`base(x) - (x W^T right) Q^T + s (dropout(x) R^T) Q^T`, in float32."""

    adapter_param_names = ("deft_P", "deft_R")
    # the removal term needs the base output of the same rows: mixed batches run each adapter's rows through
    # adapted_forward
    additive = False
    input_cast_switchable = True  # the only cast of the input goes through `cast_input`

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, target_name: str = "a linear layer",
                 **kwargs) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = linear_dims(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)  # Conv1D stores its weight (in, out)
        self.target_name = target_name
        self.deft_r: dict[str, int] = {}
        self.deft_decomposition: dict[str, str] = {}
        self.deft_para: dict[str, bool] = {}
        self.deft_scaling: dict[str, float] = {}
        self.deft_P = nn.ParameterDict()
        self.deft_R = nn.ParameterDict()
        self.deft_dropout = nn.ModuleDict()
        # right^T W (r, in, float32) of the weight each merged adapter went into: what unmerge subtracts
        self._cached_merge_factor = BufferDict(persistent=False)
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        # the projector has rank at most out_features (QR gives no more columns): r is capped, as HF PEFT
        r = min(config.r, self.out_features)
        self.deft_r[adapter_name] = r
        self.deft_decomposition[adapter_name] = config.decomposition_method
        self.deft_para[adapter_name] = config.para
        self.deft_scaling[adapter_name] = config.alpha / r if config.alpha else 1.0
        p = config.deft_dropout
        self.deft_dropout[adapter_name] = nn.Dropout(p=p) if p > 0 else nn.Identity()
        direction = torch.empty(self.out_features, r)
        nn.init.normal_(direction, mean=0.0, std=INIT_STD)
        self.deft_P[adapter_name] = nn.Parameter(direction)
        if not config.para:
            self.deft_R[adapter_name] = nn.Parameter(self._initial_injection(adapter_name, direction, config))

    def _initial_injection(self, name: str, direction: torch.Tensor, config) -> torch.Tensor:
        """(r, in) R: right^T W / s, which makes delta = 0 (init_weights), else normal(0, 0.02 init_scale)."""
        injection = torch.zeros(self.deft_r[name], self.in_features)
        weight = self.get_base_layer().weight
        if not config.init_weights:
            nn.init.normal_(injection, mean=0.0, std=INIT_STD * config.init_scale)
        elif not weight.is_meta:  # a meta base gets its values from a load
            _, right = self.project(direction.to(weight.device), name)
            injection = (right.T @ self.logical_weight()) / self.deft_scaling[name]
        return injection

    # ------------------------------------------------------------------ math
    def logical_weight(self) -> torch.Tensor:
        """The base weight as (out, in), float32, detached."""
        weight = self.get_base_layer().weight.detach().to(torch.float32)
        return weight.T if self.fan_in_fan_out else weight

    def project(self, direction: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, right), both (out, r) float32, with projector Q right^T."""
        direction = direction.to(torch.float32)
        if self.deft_decomposition[name] == "qr":
            q, _ = torch.linalg.qr(direction)
            return q, q
        return direction, torch.relu(direction)

    def merge_factor(self, name: str) -> torch.Tensor:
        """right^T W (r, in), float32: the only part of the delta that depends on the base weight."""
        _, right = self.project(self.deft_P[name], name)
        return right.T @ self.logical_weight()

    def delta_from_factor(self, name: str, factor: torch.Tensor) -> torch.Tensor:
        """Q (s R - factor) (-Q factor for PaRa) in the base weight's layout and dtype."""
        q, _ = self.project(self.deft_P[name], name)
        if self.deft_para[name]:
            delta = -(q @ factor)
        else:
            delta = q @ (self.deft_R[name].to(torch.float32) * self.deft_scaling[name] - factor)
        delta = delta.T if self.fan_in_fan_out else delta
        return delta.to(self.get_base_layer().weight.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.delta_from_factor(name, self.merge_factor(name))

    def adapted_forward(self, x, names: list[str], *args, **kwargs):
        out_dtype = x.dtype
        names = [n for n in names if n in self.deft_P]
        base_out = self.base_forward(x, *args, **kwargs)
        if not names:
            return base_out.to(out_dtype)
        result = base_out.to(torch.float32)
        bias = self.get_base_layer().bias
        # x W^T without the bias: what the removal term projects
        base_product = result if bias is None else result - bias.to(torch.float32)
        x = self.cast_input(x, torch.float32)
        for name in names:
            q, right = self.project(self.deft_P[name], name)
            result = result - (base_product @ right) @ q.T
            if not self.deft_para[name]:
                injection = self.deft_R[name].to(torch.float32) * self.deft_scaling[name]
                result = result + F.linear(self.deft_dropout[name](x), injection) @ q.T
        return result.to(out_dtype)

    # ------------------------------------------------------------------ merging
    # The removal term depends on the weight merged into: every adapter of one merge call takes its factor
    # from the weight before the call (merging a set equals the forward's sum of independent updates, as HF
    # PEFT).
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = self._active_adapters if adapter_names is None else adapter_names
        with torch.no_grad():
            self.__dict__["_pending_factors"] = {
                n: self.merge_factor(n) for n in names if n in self.deft_P and n not in self.merged_adapters}
        try:
            super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        finally:
            self.__dict__["_pending_factors"] = {}

    def merge_one(self, name: str, safe_merge: bool) -> None:
        pending = self.__dict__.get("_pending_factors", {})
        factor = pending[name] if name in pending else self.merge_factor(name)
        base = self.get_base_layer()
        with torch.no_grad():
            merged = base.weight.data + self.delta_from_factor(name, factor)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs or infs in the merged weights: adapter '{name}' seems to be broken.")
        base.weight.data = merged
        self._cached_merge_factor[name] = factor.detach()

    def unmerge_one(self, name: str) -> None:
        base = self.get_base_layer()
        with torch.no_grad():
            if name in self._cached_merge_factor:
                delta = self.delta_from_factor(name, self._cached_merge_factor[name].to(torch.float32))
                del self._cached_merge_factor[name]
            else:  # exact only while the base weight is the one merged into
                delta = self.delta_weight(name)
        base.weight.data = base.weight.data - delta
