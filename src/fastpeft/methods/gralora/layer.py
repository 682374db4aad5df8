"""GraLoRA layers (Jung et al., 2025, "GraLoRA: Granular Low-Rank Adaptation", https://arxiv.org/abs/2505.20355)
on nn.Linear and transformers' Conv1D.

The (out, in) weight is cut into a k x k grid (k = gralora_k). Block (j, n) -- output rows of block j, input
columns of block n -- gets its own rank-s update (s = r / k): A_n[:, j-th s columns] followed by
B_j[n-th s rows]. Stored as HF PEFT stores them:
  gralora_A: (k, in / k, r)   -- A_n for input block n, its r columns grouped by output block j
  gralora_B: (k, r, out / k)  -- B_j for output block j, its r rows grouped by input block n
With hybrid_r > 0 a plain LoRA pair (gralora_A_general: in -> hybrid_r, gralora_B_general: hybrid_r -> out)
adds a full-weight update. Both parts are scaled by alpha / (r + hybrid_r).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...core.layer import AdapterLayer
from .._shared.modules import is_conv1d, linear_dims


def kaiming_(tensor: torch.Tensor) -> torch.Tensor:
    """The init of nn.Linear's weight (and HF PEFT's draw for every GraLoRA factor)."""
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


class GraloraLinear(AdapterLayer):
    """`base(x) + scaling * (block-diagonal-grid update(x) + hybrid LoRA(x))`."""

    adapter_param_names = ("gralora_A", "gralora_B", "gralora_A_general", "gralora_B_general")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, target_name: str = "") -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = linear_dims(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.gralora_A = nn.ParameterDict()
        self.gralora_B = nn.ParameterDict()
        self.gralora_A_general = nn.ModuleDict()
        self.gralora_B_general = nn.ModuleDict()
        self.gralora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.hybrid_r: dict[str, int] = {}
        self.gralora_k: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.update_layer(adapter_name, config, target_name=target_name)

    def update_layer(self, adapter_name: str, config, target_name: str = "", **kwargs) -> None:
        k, r, hybrid_r = config.gralora_k, config.r, config.hybrid_r
        self._check_fits(k, target_name)
        self.r[adapter_name], self.hybrid_r[adapter_name], self.gralora_k[adapter_name] = r, hybrid_r, k
        self.alpha[adapter_name] = config.alpha
        self.scaling[adapter_name] = config.alpha / (r + hybrid_r)
        p = config.gralora_dropout
        self.gralora_dropout[adapter_name] = nn.Dropout(p=p) if p > 0 else nn.Identity()
        a, b = self._grid_factors(k, r, bool(config.init_weights))
        self.gralora_A[adapter_name], self.gralora_B[adapter_name] = a, b
        a_gen, b_gen = self._hybrid_factors(hybrid_r, bool(config.init_weights))
        self.gralora_A_general[adapter_name], self.gralora_B_general[adapter_name] = a_gen, b_gen

    def _check_fits(self, k: int, target_name: str) -> None:
        for side, size in (("in_features", self.in_features), ("out_features", self.out_features)):
            if size % k:
                raise ValueError(
                    f"GraLoRA gralora_k={k} does not divide {side}={size} of layer '{target_name}': the "
                    "weight is cut into gralora_k x gralora_k blocks. Choose a gralora_k dividing both sizes "
                    "or leave this layer out of target_modules.")

    def _grid_factors(self, k: int, r: int, zero_b: bool) -> tuple[nn.Parameter, nn.Parameter]:
        """Per block: A_n drawn as an (r, in / k) linear weight, then B_j as (out / k, r) (zeros when
        `zero_b`), in HF PEFT's order so one seed gives the same factors; then stacked and transposed to the
        stored layouts."""
        blocks_a, blocks_b = [], []
        for _ in range(k):
            a = kaiming_(torch.empty(r, self.in_features // k))
            b = torch.empty(self.out_features // k, r)
            blocks_a.append(a)
            blocks_b.append(nn.init.zeros_(b) if zero_b else kaiming_(b))
        a = torch.stack(blocks_a).transpose(1, 2).contiguous()  # (k, in / k, r)
        b = torch.stack(blocks_b).transpose(1, 2).contiguous()  # (k, r, out / k)
        return nn.Parameter(a), nn.Parameter(b)

    def _hybrid_factors(self, hybrid_r: int, zero_b: bool) -> tuple[nn.Module, nn.Module]:
        if hybrid_r == 0:
            return nn.Identity(), nn.Identity()
        # nn.Linear draws its own init first; HF PEFT then redraws A (and B unless zeroed): same RNG use
        a = nn.Linear(self.in_features, hybrid_r, bias=False)
        b = nn.Linear(hybrid_r, self.out_features, bias=False)
        kaiming_(a.weight.data)
        nn.init.zeros_(b.weight.data) if zero_b else kaiming_(b.weight.data)
        return a, b

    # ------------------------------------------------------------------ math
    def adapter_parts(self, name: str, x: torch.Tensor, out_dtype: torch.dtype) -> list[torch.Tensor]:
        """The grid update and, with hybrid_r > 0, the hybrid LoRA update, each cast to `out_dtype` before it
        is scaled: HF PEFT's rounding order, so half-precision bases give its bits."""
        a, b, k = self.gralora_A[name], self.gralora_B[name], self.gralora_k[name]
        dropout, lead, scaling = self.gralora_dropout[name], x.shape[:-1], self.scaling[name]
        s = self.r[name] // k
        xd = dropout(x.to(a.dtype))
        # h[..., n, j*s + t]: input block n through A_n, its r outputs grouped by the output block j they feed
        h = torch.einsum("...ni,nir->...nr", xd.reshape(*lead, k, self.in_features // k), a)
        # regroup: B_j reads the j-th s-chunk of every input block, in block order n
        h = h.reshape(*lead, k, k, s).transpose(-3, -2).reshape(*lead, k, k * s)
        out = torch.einsum("...jr,jro->...jo", h, b).reshape(*lead, self.out_features)
        parts = [scaling * out.to(out_dtype)]
        if self.hybrid_r[name] > 0:  # a second dropout draw, as HF PEFT (same masks from the same seed)
            hybrid = self.gralora_B_general[name](self.gralora_A_general[name](dropout(x.to(a.dtype))))
            parts.append(scaling * hybrid.to(out_dtype))
        return parts

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        parts = self.adapter_parts(name, x, self.gralora_A[name].dtype)
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]

    def add_adapters(self, result: torch.Tensor, x: torch.Tensor, names, *args, **kwargs):
        own = self.adapter_names()
        for name in names:
            if name in own:
                for part in self.adapter_parts(name, x, result.dtype):
                    result = result + part
        return result

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b, k = self.gralora_A[name], self.gralora_B[name], self.gralora_k[name]
        dtype = a.dtype
        # CPU matmuls in half precision are slow or missing: compute in float32 there, as HF PEFT
        upcast = a.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        work = torch.float32 if upcast else dtype
        s, fin, fout = self.r[name] // k, self.in_features // k, self.out_features // k
        # block (j, n) of the (out, in) weight = (A_n[:, j-chunk] @ B_j[n-chunk, :]).T, rank s
        grid = torch.einsum("nijs,jnso->joni", a.to(work).reshape(k, fin, k, s),
                            b.to(work).reshape(k, k, s, fout))
        delta = grid.reshape(self.out_features, self.in_features)
        if self.hybrid_r[name] > 0:
            delta = delta + (self.gralora_B_general[name].weight.to(work)
                             @ self.gralora_A_general[name].weight.to(work))
        delta = delta * self.scaling[name]
        return (delta.T if self.fan_in_fan_out else delta).to(dtype)
