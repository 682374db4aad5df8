"""PSOFT layers: orthogonal fine-tuning restricted to the principal subspace of the weight.

PSOFT (OpenReview, https://openreview.net/forum?id=FSHrinMArK) takes the top-r SVD of a frozen (out, in)
weight, W ~ U_r S_r V_r^T, splits it into A (r, in) and B (out, r), and trains only an r x r matrix R in
between:

    dW = scaling * B (R - I) A,        y = W x + scaling * B (R - I) A x,

so the update lives in span(U_r) x span(V_r) and is zero while R = I. With `psoft_orth` R is the Cayley
transform (I + Q)(I - Q)^-1 of a skew-symmetric Q (orthogonal: the principal directions rotate, their
lengths stay), optionally framed by trained scales: R' = diag(b) R diag(a). A and B are never trained nor
saved (non-persistent buffers): they are rebuilt from the base weight whenever the adapter is created or
loaded, so a file only holds R's parameters (`psoft_R.weight`, `psoft_R.vector_a`, `psoft_R.vector_b`).
Because B is divided by `scaling` at init, scaling cancels in dW at creation and only scales R's updates.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.layer import AdapterLayer
from .._shared import orthogonal as orth
from .._shared.random_projections import BufferDict

HALF = (torch.float16, torch.bfloat16)
SVD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision tensors on the CPU (as HF PEFT: slow or missing half kernels there), else
    `dtype` itself."""
    return torch.float32 if device.type == "cpu" and dtype in HALF else dtype


# ---------------------------------------------------------------------------------------------- the SVD split
def top_singular(weight: torch.Tensor, r: int, backend: str, niter: int, seed: int):
    """(U_r (out, r), S_r (r,), V_r^T (r, in)) of a float32 (out, in) weight. 'lowrank' is randomised: it runs
    on a forked RNG seeded with `seed`, so the same weight always gives the same factors (a load rebuilds
    what training used) and the caller's RNG stream is not consumed."""
    if backend == "full":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        return u[:, :r], s[:r], vh[:r, :]
    if weight.device.type == "cpu":
        fork = {"devices": []}
    else:  # torch.manual_seed reseeds every accelerator: fork the one the SVD runs on
        fork = {"devices": [weight.device], "device_type": weight.device.type}
    with torch.random.fork_rng(**fork):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(weight, q=r, niter=niter)
    return u[:, :r], s[:r], v[:, :r].t()


@torch.no_grad()
def principal_factors(weight: torch.Tensor, r: int, scaling: float, split: str, backend: str, niter: int,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) in float32 with B A = U_r S_r V_r^T / scaling.

    'psoft_init': A = V_r^T has orthonormal rows, so R acts on an orthonormal basis of the input subspace
    (the paper's split); 'pissa_init': the singular values are shared, A = sqrt(S) V_r^T, B = U_r sqrt(S).
    """
    u, s, vh = top_singular(weight.float(), r, backend, niter, seed)
    s = s / scaling
    if split == "psoft_init":
        a, b = vh, u @ torch.diag(s)
    else:
        root = torch.sqrt(s)
        a, b = torch.diag(root) @ vh, u @ torch.diag(root)
    return a.contiguous(), b.contiguous()


# ------------------------------------------------------------------------------------------------- R itself
class PsoftRotation(nn.Module):
    """The trained r x r matrix R of one adapter on one layer. Parameters as HF PEFT names them: `weight`
    (the r(r-1)/2 upper-triangle entries of Q when orthogonal, else R itself, (r, r)), `vector_b` (output-side
    scales, (r,)) and `vector_a` (input-side scales, (r,)), each only when its option is on."""

    def __init__(self, r: int, config, like: torch.Tensor) -> None:
        super().__init__()
        self.size = r
        self.orth = bool(config.psoft_orth)
        self.neumann_terms = int(config.num_cayley_neumann_terms) if config.use_cayley_neumann else None
        self.neumann_eps = config.cayley_neumann_eps
        # drawn on the base weight's device and in its dtype, as HF PEFT does, so a seed gives its values
        factory = {"device": like.device, "dtype": like.dtype if like.is_floating_point() else None}
        self.weight = nn.Parameter(self._initial_weight(r, config.init_weights, factory))
        self.vector_b = nn.Parameter(torch.ones(r, **factory)) if config.psoft_mag_b else None
        self.vector_a = nn.Parameter(torch.ones(r, **factory)) if config.psoft_mag_a else None

    def _initial_weight(self, r: int, identity: bool, factory: dict) -> torch.Tensor:
        """Q = 0 (R = I) or R = I; with init_weights=False, noise of std 0.1 on either (HF PEFT's draws)."""
        if self.orth:
            weight = torch.zeros(r * (r - 1) // 2, **factory)
            return weight if identity else nn.init.normal_(weight, mean=0.0, std=0.1)
        weight = torch.eye(r, **factory)
        return weight if identity else weight + torch.randn_like(weight) * 0.1

    def matrix(self) -> torch.Tensor:
        """R' = diag(b) R diag(a) (r, r). The exact Cayley transform is solved in float32 for half-precision
        parameters (no half solver) and R' returned in their dtype; the Neumann series runs in their dtype."""
        if not self.orth:
            rotation, narrowed = self.weight, None
        else:
            skew = orth.skew_from_vector(self.weight.unsqueeze(0), self.size)  # (1, r, r)
            narrowed = None
            if self.neumann_terms is not None:
                if self.neumann_eps is not None:
                    skew = orth.clip_frobenius(skew, self.neumann_eps)
                rotation = orth.cayley_neumann(skew, self.neumann_terms)[0]
            else:
                if skew.dtype in HALF:
                    narrowed, skew = skew.dtype, skew.float()
                # (I + Q)(I - Q)^-1 is the shared (I - S)(I + S)^-1 with S = -Q
                rotation = orth.cayley_exact(-skew)[0]
        if self.vector_b is not None:
            rotation = self.vector_b[:, None] * rotation
        if self.vector_a is not None:
            rotation = rotation * self.vector_a[None, :]
        return rotation if narrowed is None else rotation.to(narrowed)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., r) -> h R'^T, in float32 for half-precision inputs on the CPU."""
        dtype = compute_dtype(h.device, h.dtype)
        return (h.to(dtype) @ self.matrix().to(dtype).t()).to(h.dtype)

    def extra_repr(self) -> str:
        return (f"size={self.size}, orth={self.orth}, neumann_terms={self.neumann_terms}, "
                f"mag_b={self.vector_b is not None}, mag_a={self.vector_a is not None}")


# ---------------------------------------------------------------------------------------------- the layers
class PsoftLayer(AdapterLayer):
    """Per-adapter state of a PSOFT layer: R in `psoft_R`, the frozen factors in `_psoft_A_cache` /
    `_psoft_B_cache` (non-persistent: rebuilt, never saved) and the settings they were built with."""

    adapter_param_names = ("psoft_R",)
    input_cast_switchable = True  # every cast of the input goes through cast_input

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, target_name: str = "a layer",
                 **kwargs) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.target_name = target_name
        self.fan_in_fan_out = False  # nn.Linear only
        self.psoft_R = nn.ModuleDict()
        self.psoft_dropout = nn.ModuleDict()
        self._psoft_A_cache = BufferDict(persistent=False)
        self._psoft_B_cache = BufferDict(persistent=False)
        self.r: dict[str, int] = {}
        self.psoft_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.ab_svd_init: dict[str, str] = {}
        self.psoft_svd: dict[str, str] = {}
        self.psoft_svd_lowrank_niter: dict[str, int] = {}
        self.random_seed: dict[str, int] = {}
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        r = config.r
        check_fits(r, self.in_features, self.out_features, self.target_name)
        weight = self.base_layer.weight
        self.r[adapter_name] = r
        self.psoft_alpha[adapter_name] = config.psoft_alpha
        self.scaling[adapter_name] = config.psoft_alpha / r
        for option in ("ab_svd_init", "psoft_svd", "psoft_svd_lowrank_niter", "random_seed"):
            getattr(self, option)[adapter_name] = getattr(config, option)
        p = config.psoft_dropout
        self.psoft_dropout[adapter_name] = nn.Dropout(p=p) if p > 0.0 else nn.Identity()
        self.psoft_R[adapter_name] = PsoftRotation(r, config, weight)
        self.rebuild_factors(adapter_name)

    def rebuild_factors(self, adapter_name: str) -> None:
        """A and B of `adapter_name` from the current base weight (float32, on its device)."""
        a, b = principal_factors(self.base_layer.weight.detach(), self.r[adapter_name],
                                 self.scaling[adapter_name], self.ab_svd_init[adapter_name],
                                 self.psoft_svd[adapter_name], self.psoft_svd_lowrank_niter[adapter_name],
                                 self.random_seed[adapter_name])
        self._psoft_A_cache[adapter_name] = a
        self._psoft_B_cache[adapter_name] = b

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        for factors in (self._psoft_A_cache, self._psoft_B_cache):
            if name in factors:
                del factors[name]


class Linear(PsoftLayer):
    """`base(x) + scaling * B (R' - I) A dropout(x)` on an nn.Linear (HF PEFT's class name)."""

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        a = self._psoft_A_cache[name]
        x = self.psoft_dropout[name](self.cast_input(x, a.dtype))
        a = a.to(device=x.device, dtype=x.dtype)
        b = self._psoft_B_cache[name].to(device=x.device, dtype=x.dtype)
        h = x @ a.t()  # (..., r): coordinates in the principal input subspace
        return ((self.psoft_R[name](h) - h) @ b.t()) * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """(out, in) scaling * B (R' - I) A, in the base weight's dtype (computed in float32 for a
        half-precision weight on the CPU)."""
        weight = self.base_layer.weight
        dtype = compute_dtype(weight.device, weight.dtype)
        a, b = (f[name].to(device=weight.device, dtype=dtype) for f in (self._psoft_A_cache,
                                                                          self._psoft_B_cache))
        rotation = self.psoft_R[name].matrix().to(device=weight.device, dtype=dtype)
        eye = torch.eye(rotation.shape[0], device=weight.device, dtype=dtype)
        return (b @ (rotation - eye) @ a * self.scaling[name]).to(weight.dtype)

    get_delta_weight = delta_weight  # HF PEFT's name


def check_fits(r, in_features: int, out_features: int, where: str) -> None:
    """r must not exceed the layer's smaller side: the SVD has only min(in, out) directions."""
    if r > min(in_features, out_features):
        raise ValueError(f"PSOFT r={r} does not fit layer '{where}': it must be at most min(in_features, "
                         f"out_features) = min({in_features}, {out_features}).")
