"""HRA layers: the base weight times a product of Householder reflections H_i = I - 2 u_i u_i^T / |u_i|^2.

Yuan et al., "Bridging the Gap between Low-rank and Orthogonal Adaptation via Householder Reflection
Adaptation" (https://arxiv.org/abs/2405.17484). The adapted weight is W R with R = H_1 H_2 ... H_r acting on
the input side (for Conv2d, on the flattened (in_channels * k * k) axis). R is orthogonal, so unmerging
multiplies by R^T = H_r ... H_1 and restores W exactly (up to rounding). With `apply_GS` the vectors are first
orthonormalised (modified Gram-Schmidt) and R = I - 2 U U^T, which is its own inverse.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer

logger = logging.getLogger(__name__)


def gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """Columns of `u` made orthonormal one after the other (modified Gram-Schmidt)."""
    basis: list[torch.Tensor] = []
    for i in range(u.shape[1]):
        v = u[:, i:i + 1]
        for q in basis:
            v = v - (q.t() @ v) * q
        basis.append(v / v.norm())
    return torch.cat(basis, dim=1)


def reflection_product(u: torch.Tensor, apply_gs: bool, reverse: bool = False) -> torch.Tensor:
    """R = H_1 ... H_r (or H_r ... H_1 when `reverse`) for the columns of `u` (shape (n, r))."""
    eye = torch.eye(u.shape[0], device=u.device, dtype=u.dtype)
    if apply_gs:
        q = gram_schmidt(u)
        return eye - 2 * q @ q.t()
    unit = u / u.norm(dim=0)
    order = range(u.shape[1] - 1, -1, -1) if reverse else range(u.shape[1])
    out = eye
    for i in order:
        col = unit[:, i:i + 1]
        out = out - 2 * (out @ col) @ col.t()
    return out


class HRALayer(AdapterLayer):
    """Shared by Linear and Conv2d: `flat_in` is the length of the axis the reflections act on."""

    adapter_param_names = ("hra_u",)
    additive = False

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        super().__init__(base_layer)
        self.hra_u = nn.ParameterDict()
        self.hra_r: dict[str, int] = {}
        self.hra_apply_GS: dict[str, bool] = {}
        self.update_layer(adapter_name, config)

    @property
    def flat_in(self) -> int:
        weight = self.base_layer.weight
        return weight[0].numel()

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        r = config.r
        self.hra_r[adapter_name] = r
        self.hra_apply_GS[adapter_name] = bool(config.apply_GS)
        self.hra_u[adapter_name] = nn.Parameter(self._initial_vectors(r, bool(config.init_weights)))

    def _initial_vectors(self, r: int, symmetric: bool) -> torch.Tensor:
        """init_weights=True: each vector twice in a row, so H_2k-1 H_2k = I and the product is the
        identity."""
        if symmetric and r % 2:
            logger.warning("HRA r=%d is odd: the identity start needs an even r; using random vectors.", r)
        if not symmetric or r % 2:
            u = torch.empty(self.flat_in, r)
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))
            return u
        half = torch.zeros(self.flat_in, r // 2)
        nn.init.kaiming_uniform_(half, a=math.sqrt(5))
        return torch.repeat_interleave(half, 2, dim=1)

    def rotation(self, name: str, reverse: bool = False) -> torch.Tensor:
        return reflection_product(self.hra_u[name], self.hra_apply_GS[name], reverse)

    def combined_rotation(self, names: list[str], dtype: torch.dtype) -> torch.Tensor:
        eye = torch.eye(self.flat_in, device=self.base_layer.weight.device, dtype=dtype)
        out = eye
        for name in names:
            if name in self.hra_u:
                rot = self.rotation(name)
                out = out.to(rot.dtype) @ rot
        return out

    def rotated_weight(self, rot: torch.Tensor) -> torch.Tensor:
        """The base weight (any layout) times `rot` on its flattened input axis."""
        weight = self.base_layer.weight
        flat = weight.reshape(weight.shape[0], -1).to(rot.dtype)
        return (flat @ rot).reshape(weight.shape)

    def adapted_forward(self, x, names: list[str], *args, **kwargs):
        own = [n for n in names if n in self.hra_u]
        if not own:
            return self.base_forward(x, *args, **kwargs)
        rot = self.combined_rotation(own, self.hra_u[own[0]].dtype)
        weight = self.rotated_weight(rot)
        bias = self.base_layer.bias
        bias = None if bias is None else bias.to(weight.dtype)
        return self.apply_weight(x.to(weight.dtype), weight, bias).to(x.dtype)

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # ------------------------------------------------------------------ merging: W <- W R, W <- W R^T
    def merge_one(self, name: str, safe_merge: bool) -> None:
        self._set_weight(self.rotated_weight(self.rotation(name)), name if safe_merge else None)

    def unmerge_one(self, name: str) -> None:
        self._set_weight(self.rotated_weight(self.rotation(name, reverse=True)), None)

    def _set_weight(self, value: torch.Tensor, check_name: str | None) -> None:
        if check_name is not None and not torch.isfinite(value).all():
            raise ValueError(
                f"NaNs or infs in the merged weights: adapter '{check_name}' seems to be broken.")
        base = self.base_layer.weight
        base.data = value.detach().to(base.dtype)


class Linear(HRALayer):
    def apply_weight(self, x, weight, bias):
        return F.linear(x, weight, bias)


class Conv2d(HRALayer):
    def __init__(self, base_layer: nn.Conv2d, adapter_name: str, config, **kwargs) -> None:
        check_conv(base_layer, kwargs.get("target_name", "a Conv2d"))
        super().__init__(base_layer, adapter_name, config, **kwargs)

    def apply_weight(self, x, weight, bias):
        return self.base_layer._conv_forward(x, weight, bias)


def check_conv(conv: nn.Conv2d, name: str) -> None:
    """HF PEFT sizes the vectors as in_channels * k[0]**2: only ungrouped, square kernels fit that layout."""
    if conv.groups > 1:
        raise NotImplementedError(
            f"HRA does not support Conv2d layers with groups > 1 ('{name}' has groups={conv.groups}); leave "
            "it out of target_modules (or add it to exclude_modules).")
    if conv.kernel_size[0] != conv.kernel_size[1]:
        raise NotImplementedError(
            f"HRA supports square Conv2d kernels only ('{name}' has kernel_size={tuple(conv.kernel_size)}); "
            "leave it out of target_modules (or add it to exclude_modules).")
