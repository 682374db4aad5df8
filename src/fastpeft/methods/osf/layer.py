"""OSF layers: train the low singular triplets of a weight, gradients kept off the frozen top subspace.

Nayak et al., "Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual Learning"
(https://arxiv.org/abs/2504.07097). The (out, in) weight W = U S V^T (float32 SVD, thin) is split at
k = effective_rank: the top k triplets (U_high (out, k), V_high (k, in)) stay frozen, the m - k others
(m = min(out, in); U_low (out, m - k), S_low (m - k,), V_low (m - k, in)) train. The base weight itself is
kept; the adapter adds

    dW = U_low diag(S_low) V_low - U0 diag(S0) V0,

(U0, S0, V0: the low triplets at creation, frozen buffers not stored in files), zero while the factors are
at their init. Gradients of U_low / V_low are projected off the top subspace: (I - U_high U_high^T) dU and
dV (I - V_high^T V_high). Where a factor's side is square (U when out <= in, V when out >= in) the
complement is spanned by the initial low vectors, and the projection is U0 U0^T dU (V: dV V0^T V0), as
HF PEFT computes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer
from .._shared.random_projections import BufferDict

# frozen per-adapter tensors (buffers, never in files): the initial low triplets and, where a side is not
# square, the top singular vectors the gradient projection needs
INIT_BUFFERS = ("_osf_U_low_init", "_osf_S_low_init", "_osf_V_low_init")
HIGH_BUFFERS = ("_osf_U_high", "_osf_V_high")

REFUSE_UNMERGE = (
    "OSF cannot unmerge: merging adds U_low S_low V_low - U0 S0 V0 into the base weight and, as in HF PEFT "
    "0.21, the weight from before is not kept. Use merge_and_unload() to keep the merged model, or "
    "unload() / disable_adapter() on a model that was not merged."
)


class _ProjectedGradient(torch.autograd.Function):
    """Identity in forward; in backward the factor's gradient is projected (the paper's constraint).

    `basis` (out, j) for a left factor U (gradient (out, r)), (j, in) for a right factor V (gradient
    (r, in)); `complement`: subtract the projection onto `basis` (the top vectors) instead of keeping it
    (the initial low vectors)."""

    @staticmethod
    def forward(ctx, factor: torch.Tensor, basis: torch.Tensor, left: bool, complement: bool):
        ctx.save_for_backward(basis)
        ctx.left, ctx.complement = left, complement
        return factor.view_as(factor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (basis,) = ctx.saved_tensors
        dtype = torch.promote_types(grad.dtype, basis.dtype)
        g, b = grad.to(dtype), basis.to(dtype)
        if ctx.left:
            projected = b @ (b.transpose(0, 1) @ g)
        else:
            projected = (g @ b.transpose(0, 1)) @ b
        result = g - projected if ctx.complement else projected
        return result.to(grad.dtype), None, None, None


class OsfLinear(AdapterLayer):
    """`base(x) + x dW^T` on an nn.Linear, dW as in the module docstring (applied factored: rank 2(m - k))."""

    adapter_param_names = ("osf_svd_params",)
    input_cast_switchable = True

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config, effective_rank: int | None = None,
                 target_name: str = "an nn.Linear", **kwargs) -> None:
        super().__init__(base_layer)
        self.out_features, self.in_features = base_layer.weight.shape
        self.target_name = target_name
        self.osf_svd_params = nn.ModuleDict()
        for attr in INIT_BUFFERS + HIGH_BUFFERS:
            setattr(self, attr, BufferDict(persistent=False))
        self.effective_rank: dict[str, int] = {}
        self.update_layer(adapter_name, config, effective_rank=effective_rank)

    # ------------------------------------------------------------------ creation
    def update_layer(self, adapter_name: str, config, effective_rank: int | None = None, **kwargs) -> None:
        weight = self.base_layer.weight
        smaller = min(self.out_features, self.in_features)
        k = smaller // 2 if effective_rank is None else effective_rank
        if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= smaller:
            raise ValueError(f"OSF effective_rank={k!r} does not fit '{self.target_name}': it must be in "
                             f"[1, {smaller}] (min(out, in) of its {tuple(weight.shape)} weight).")
        if weight.is_meta:
            raise ValueError(f"OSF needs the values of the weight of '{self.target_name}' to build its "
                             "adapter (the frozen subspace is the weight's SVD); load the base model's "
                             "weights first.")
        parts = self._split_svd(weight.detach(), k)
        self.effective_rank[adapter_name] = k
        for attr, name in zip(INIT_BUFFERS, ("U_low", "S_low", "V_low")):
            getattr(self, attr)[adapter_name] = parts[name].clone()
        # a top subspace is stored only where the initial low vectors do not span its complement
        if self.out_features > self.in_features:
            self._osf_U_high[adapter_name] = parts["U_high"]
        if self.out_features < self.in_features:
            self._osf_V_high[adapter_name] = parts["V_high"]
        factors = [parts["U_low"], parts["S_low"], parts["V_low"]]
        if config.init_weights is False:
            # the global RNG in HF PEFT's order (U, S, V), in the weight's dtype: a seed gives its values
            factors = [torch.randn_like(f) for f in factors]
        self.osf_svd_params[adapter_name] = nn.ParameterDict(
            {name: nn.Parameter(f) for name, f in zip(("U_low", "S_low", "V_low"), factors)})

    @staticmethod
    @torch.no_grad()
    def _split_svd(weight: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
        """Thin SVD in float32, cut after the top k triplets; every part in the weight's dtype and device."""
        u, s, vt = torch.linalg.svd(weight.to(torch.float32), full_matrices=False)

        def part(t: torch.Tensor) -> torch.Tensor:
            return t.contiguous().to(device=weight.device, dtype=weight.dtype)

        return {"U_high": part(u[:, :k]), "V_high": part(vt[:k, :]),
                "U_low": part(u[:, k:]), "S_low": part(s[k:]), "V_low": part(vt[k:, :])}

    def frozen_buffers(self, name: str) -> list[tuple[BufferDict, str]]:
        return [(getattr(self, a), name) for a in INIT_BUFFERS + HIGH_BUFFERS if name in getattr(self, a)]

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"OSF adapter '{name}' is merged into '{self.target_name}'. {REFUSE_UNMERGE}")
        super().delete_adapter(name)
        for holder, key in self.frozen_buffers(name):
            del holder[key]

    # ------------------------------------------------------------------ forward
    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U_low, S_low, V_low), U and V routed through the gradient projection when they train."""
        params = self.osf_svd_params[name]
        u, s, v = params["U_low"], params["S_low"], params["V_low"]
        if torch.is_grad_enabled() and u.requires_grad:
            high = self._osf_U_high[name] if name in self._osf_U_high else None
            u = _ProjectedGradient.apply(u, self._osf_U_low_init[name] if high is None else high, True,
                                         high is not None)
        if torch.is_grad_enabled() and v.requires_grad:
            high = self._osf_V_high[name] if name in self._osf_V_high else None
            v = _ProjectedGradient.apply(v, self._osf_V_low_init[name] if high is None else high, False,
                                         high is not None)
        return u, s, v

    def adapted_forward(self, x, names: list[str], *args, **kwargs):
        own = [n for n in names if self.has_adapter(n)]
        if len(own) > 1:
            raise ValueError(
                f"OSF runs one adapter at a time, but {own} are active on '{self.target_name}': HF PEFT "
                "0.21's forward would use only the first of them while its merge adds them all. Activate one "
                "adapter (set_adapter), or use adapter_names=[...] to give each row its own.")
        return super().adapted_forward(x, names, *args, **kwargs)

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """x dW^T as (x B^T) A^T with A = [U_low S_low, -U0 S0] (out, 2r), B = [V_low; V0] (2r, in): no
        (out, in) matrix is formed."""
        u, s, v = self._factors(name)
        u0, s0, v0 = (getattr(self, a)[name] for a in INIT_BUFFERS)
        a = torch.cat([u * s.unsqueeze(0), -(u0 * s0.unsqueeze(0))], dim=1)
        b = torch.cat([v, v0], dim=0)
        out_dtype = x.dtype
        return F.linear(F.linear(self.cast_input(x, a.dtype), b), a).to(out_dtype)

    # ------------------------------------------------------------------ merging
    def delta_weight(self, name: str) -> torch.Tensor:
        """(out, in): U_low diag(S_low) V_low - U0 diag(S0) V0."""
        params = self.osf_svd_params[name]
        u0, s0, v0 = (getattr(self, a)[name] for a in INIT_BUFFERS)
        current = torch.mm(params["U_low"] * params["S_low"].unsqueeze(0), params["V_low"])
        return current - torch.mm(u0 * s0.unsqueeze(0), v0)

    def merge_one(self, name: str, safe_merge: bool) -> None:
        # as HF PEFT: the sum in the wider of the two dtypes, rounded once to the weight's
        weight = self.base_layer.weight
        merged = (weight.data + self.delta_weight(name)).to(weight.dtype)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs detected in the merged weights: OSF adapter '{name}' on "
                             f"'{self.target_name}' seems to be broken.")
        weight.data = merged

    def unmerge(self) -> None:
        if self.merged_adapters:
            raise NotImplementedError(f"'{self.target_name}' holds merged adapter(s) {self.merged_adapters}. "
                                      + REFUSE_UNMERGE)

    def check_mixed_batch(self, x, adapter_names: list[str]) -> None:
        if self.merged:
            raise ValueError("Mixed-adapter batches need unmerged adapters, and this OSF model has merged "
                             f"ones. {REFUSE_UNMERGE}")
        super().check_mixed_batch(x, adapter_names)
