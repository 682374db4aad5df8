"""FRoD layer for nn.Linear and transformers' Conv1D.

FRoD (https://doi.org/10.1609/aaai.v40i31.39813) writes a (out, in) weight as W = U diag(lambda) V^T, with
V (in, in) a basis shared by all layers of one role (built in model.py) and U (out, in), lambda (in,) solved
per layer from W = B V^T (B = W V^-T, lambda = column norms of B, U = B / lambda). It trains lambda and the
values of a sparse off-diagonal S (in, in) at fixed positions, and the layer computes with the adapted weight

    W' = U (S + diag(lambda)) V^T,

so the adapter's part of the output is W' h - W h (h: the dropped-out input). As HF PEFT, one active adapter
without active dropout computes W' x + b alone; several adapters (or dropout) add W'_i h_i - W h_i to base(x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer
from .._shared.random_projections import BufferDict, in_out_features

NORM_FLOOR = 1e-12  # columns of B with a smaller norm get a zero column in U (as HF PEFT)


def solve_factors(v: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U (out, in), lambda (in,)) in float32 with W = U diag(lambda) V^T, solved in float64; a singular V
    falls back to its pseudo-inverse."""
    w, v = w.detach().to(device="cpu", dtype=torch.float64), v.detach().to(device="cpu", dtype=torch.float64)
    try:
        b = torch.linalg.solve(v, w.T).T
    except RuntimeError:
        b = w @ torch.linalg.pinv(v, rtol=1e-6).T
    lam = torch.linalg.norm(b, dim=0)
    u = torch.zeros_like(b)
    keep = lam > NORM_FLOOR
    u[:, keep] = b[:, keep] / lam[keep]
    return u.float(), lam.float()


class FrodLinear(AdapterLayer):
    adapter_param_names = ("frod_lambda_l", "frod_lambda_s_values")
    # rows of one adapter run through `adapted_forward` in mixed batches: the single-adapter path there
    # skips the base product, as HF PEFT's forward does
    additive = False

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, projections,
                 fan_in_fan_out: bool = False, target_name: str = "") -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = in_out_features(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.target_name = target_name
        self.r: dict[str, int] = {}
        self.frod_dropout = nn.ModuleDict()
        self.frod_lambda_l = nn.ParameterDict()
        self.frod_lambda_s_values = nn.ParameterDict()
        self.frod_U = BufferDict(persistent=False)  # frozen, rebuilt from W and V, never saved
        self._weight_before_merge: torch.Tensor | None = None
        self.update_layer(adapter_name, config, projections=projections)

    def share_projections(self, projections) -> None:
        # plain attributes, not submodules: the tuner owns (saves and moves) its per-role stores
        for attr, store in zip(("frod_V", "frod_s_indices", "frod_s_size"), projections):
            object.__setattr__(self, attr, store)

    def update_layer(self, adapter_name: str, config, projections=None, **kwargs) -> None:
        if projections is not None:
            self.share_projections(projections)
        weight = self.base_weight_out_in(self.get_base_layer().weight)
        v = self.frod_V[adapter_name]
        if tuple(v.shape) != (self.in_features, self.in_features):
            raise ValueError(f"FRoD adapter '{adapter_name}': the shared basis V has shape {tuple(v.shape)} "
                             f"but layer '{self.target_name}' needs {(self.in_features, self.in_features)}.")
        self.r[adapter_name] = self.out_features
        p = config.frod_dropout
        self.frod_dropout[adapter_name] = nn.Dropout(p=p) if p > 0 else nn.Identity()
        nnz = self.frod_s_indices[adapter_name].shape[1]
        u, lam = solve_factors(v.to(weight.dtype), weight)
        self.frod_lambda_s_values[adapter_name] = nn.Parameter(torch.zeros(nnz, dtype=weight.dtype))
        self.frod_lambda_l[adapter_name] = nn.Parameter(lam.to(weight.dtype))
        if not config.init_weights:  # the global RNG in HF PEFT's order: S values, then lambda's noise
            with torch.no_grad():
                nn.init.normal_(self.frod_lambda_s_values[adapter_name], std=0.1)
                lam_param = self.frod_lambda_l[adapter_name]
                lam_param.add_(torch.randn_like(lam_param) * 0.1)
        self.frod_U[adapter_name] = u.to(weight.dtype).to(weight.device)

    def rebuild_u(self, name: str) -> None:
        """U solved again from the base weight and the basis V now held (a loaded one): a V decomposed
        elsewhere (another dtype or platform: eigenvectors may flip sign or swap) must not meet a U solved
        for the local V. The trained lambda stays as loaded."""
        weight = self.base_weight_out_in(self.get_base_layer().weight)
        u, _ = solve_factors(self.frod_V[name].to(weight.dtype), weight)
        old = self.frod_U[name]
        self.frod_U[name] = u.to(device=old.device, dtype=old.dtype)

    def base_weight_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.fan_in_fan_out else weight

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        if name in self.frod_U:
            del self.frod_U[name]

    # ------------------------------------------------------------------ forward
    def _tensors(self, name: str, device, dtype):
        """U (out, in), V (in, in), S positions (2, nnz), S values (nnz,), lambda (in,) on `device` in
        `dtype`."""
        return (self.frod_U[name].to(device=device, dtype=dtype),
                self.frod_V[name].to(device=device, dtype=dtype),
                self.frod_s_indices[name].to(device=device, dtype=torch.long),
                self.frod_lambda_s_values[name].to(device=device, dtype=dtype),
                self.frod_lambda_l[name].to(device=device, dtype=dtype))

    def adapted_product(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """h W'^T = ((z S^T + z diag(lambda)) U^T, z = h V: (..., in) -> (..., out), no bias."""
        u, v, idx, values, lam = self._tensors(name, h.device, h.dtype)
        z = h.reshape(-1, h.shape[-1]) @ v
        # (z S^T)[:, i] = sum over entries (i, j) of S_ij z[:, j]: the sparse product without a dense S
        z_s = torch.zeros_like(z).index_add(1, idx[0], z[:, idx[1]] * values)
        out = F.linear(z_s + z * lam, u)
        return out.reshape(*h.shape[:-1], out.shape[-1])

    def _dropout_on(self, name: str) -> bool:
        drop = self.frod_dropout[name]
        return not isinstance(drop, nn.Identity) and drop.training

    def adapted_forward(self, x, names: list[str], *args, **kwargs):
        names = [n for n in names if self.has_adapter(n)]
        bias = getattr(self.get_base_layer(), "bias", None)
        if len(names) == 1 and not self._dropout_on(names[0]):
            out = self.adapted_product(names[0], x)
            return (out if bias is None else out + bias).to(x.dtype)
        result = self.base_forward(x, *args, **kwargs)
        base_out = result if bias is None else result - bias
        for name in names:
            h = self.frod_dropout[name](x)
            if self._dropout_on(name):
                w = self.base_weight_out_in(self.get_base_layer().weight).to(device=x.device, dtype=x.dtype)
                base_h = F.linear(h, w)
            else:
                base_h = base_out
            result = result + self.adapted_product(name, h) - base_h
        return result.to(x.dtype)

    # ------------------------------------------------------------------ merging
    def adapted_weight(self, name: str, device, dtype) -> torch.Tensor:
        """W' = U (S + diag(lambda)) V^T, (out, in)."""
        u, v, idx, values, lam = self._tensors(name, device, dtype)
        s = torch.zeros(self.in_features, self.in_features, device=device, dtype=dtype)
        s = s.index_put((idx[0], idx[1]), values) + torch.diag_embed(lam)
        return u @ s @ v.T

    def delta_weight(self, name: str) -> torch.Tensor:
        """W' - W0 in the base weight's layout, W0 the weight before the first merge (kept until unmerge, so
        the deltas of several merged adapters all start from it, as in HF PEFT)."""
        weight = self.get_base_layer().weight
        if self._weight_before_merge is None:
            self._weight_before_merge = weight.detach().clone()
        w0 = self.base_weight_out_in(self._weight_before_merge.to(device=weight.device, dtype=weight.dtype))
        delta = self.adapted_weight(name, weight.device, weight.dtype) - w0
        return self.base_weight_out_in(delta)

    def unmerge(self) -> None:
        """Back to the weight saved before the first merge (exact, for every merged adapter at once)."""
        if not self.merged_adapters:
            return
        weight = self.get_base_layer().weight
        with torch.no_grad():
            weight.data.copy_(self._weight_before_merge.to(device=weight.device, dtype=weight.dtype))
        self._weight_before_merge = None
        self.merged_adapters.clear()
