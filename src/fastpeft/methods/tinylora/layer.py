"""TinyLoRA layers for nn.Linear, transformers' Conv1D and nn.Embedding.

"Learning to Reason in 13 Parameters" (https://arxiv.org/abs/2602.04118) builds on LoRA-XS: for a weight W
(out, in) with SVD W = U S V^T, the frozen factors are
    A = diag(sqrt(S_r)) V_r^T    (r, in)
    B = U_r diag(sqrt(S_r))      (out, r)
(r = min(config r, out, in)), and the only trained tensor is a vector v (u,) mixing u frozen random matrices
P (u, r, r), drawn N(0, 1/r) from `projection_seed + layer number`:
    R = sum_i v[i] P[i]          (r, r)
    dW = B R A                   (out, in)
v belongs to the tuner (`weight_tying` lets groups of layers share one); each layer holds a reference to
the tuner's dict of vectors (so parameter names are HF PEFT's) and the key of its group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer
from .._shared.modules import is_conv1d
from .._shared.random_projections import BufferDict, seeded_normal

FACTOR_NAMES = ("tinylora_A", "tinylora_B")
PROJECTION = "tinylora_P"
HALF = (torch.float16, torch.bfloat16)


def svd_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r', in), B (out, r')) of `weight` (out, in), r' = min(r, out, in): the top singular triplets
    with sqrt(S) on each side (so neither factor dominates in norm). SVD in float32, factors in the weight's
    dtype."""
    u_mat, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    rank = min(r, *weight.shape)
    dtype = weight.dtype
    root = torch.sqrt(s[:rank].to(dtype))
    a = (root.unsqueeze(1) * vh[:rank].to(dtype)).contiguous()
    b = (u_mat[:, :rank].to(dtype) * root.unsqueeze(0)).contiguous()
    return a, b


class TinyLoraLayer(AdapterLayer):
    """The per-adapter frozen A, B, P (buffers) and the reference to the tuner's trained v."""

    adapter_param_names = ()  # the trained v is the tuner's: adapters are found through the A buffers

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, tinylora_v: nn.ModuleDict,
                 v_key: str, layer_index: int, widen: bool = True, target_name: str = "") -> None:
        super().__init__(base_layer)
        self.target_name = target_name
        self.layer_index = layer_index  # position among the adapter's targets: P's seed offset
        self.r: dict[str, int] = {}
        self.u: dict[str, int] = {}
        self.v_key: dict[str, str] = {}  # adapter -> key of its group's v in tinylora_v[adapter]
        self.save_projection: dict[str, bool] = {}
        self.tinylora_dropout = nn.ModuleDict()
        self.tinylora_A = BufferDict(persistent=True)
        self.tinylora_B = BufferDict(persistent=True)
        self.tinylora_P = BufferDict(persistent=config.save_projection)
        self.update_layer(adapter_name, config, tinylora_v=tinylora_v, v_key=v_key, widen=widen)

    def weight_2d(self) -> torch.Tensor:
        """The base weight as (out, in) (Conv1D stores it (in, out))."""
        return self.get_base_layer().weight

    def update_layer(self, adapter_name: str, config, tinylora_v: nn.ModuleDict | None = None,
                     v_key: str = "0", widen: bool = True, **kwargs) -> None:
        # registered after the buffers, as HF PEFT: the first layer holding the dict names the parameters
        self.tinylora_v = tinylora_v
        self.v_key[adapter_name] = v_key
        self.u[adapter_name] = config.u
        self.save_projection[adapter_name] = config.save_projection
        self.tinylora_P.persistent = config.save_projection  # one value for all adapters (the tuner checks)
        p = config.tinylora_dropout
        self.tinylora_dropout[adapter_name] = nn.Dropout(p=p) if p > 0 else nn.Identity()
        weight = self.weight_2d().detach()
        a, b = svd_factors(weight, config.r)
        rank = a.shape[0]
        self.r[adapter_name] = rank
        # seeded by the layer's position among the targets of the adapter that created it (later adapters
        # reuse it, as HF PEFT)
        proj = seeded_normal((config.u, rank, rank), config.projection_seed + self.layer_index,
                             1.0 / rank ** 0.5)
        # as HF PEFT: in the base weight's dtype and device, widened to float32 from fp16 / bf16 when
        # autocast_adapter_dtype (the values keep the half-precision rounding)
        dtype = torch.float32 if widen and weight.dtype in HALF else weight.dtype
        for store, tensor in zip((self.tinylora_A, self.tinylora_B, self.tinylora_P), (a, b, proj)):
            store[adapter_name] = tensor.to(device=weight.device, dtype=weight.dtype).to(dtype)

    # ------------------------------------------------------------------ adapter bookkeeping
    def adapter_names(self) -> set[str]:
        return set(self.tinylora_A.keys())

    def has_adapter(self, name: str) -> bool:
        return name in self.tinylora_A

    def vector(self, name: str) -> nn.Parameter:
        return self.tinylora_v[name][self.v_key[name]]

    def adapter_parameters(self, name: str):
        if name in self.tinylora_A:
            yield f"tinylora_v.{name}.{self.v_key[name]}", self.vector(name)

    def adapter_tensors(self, name: str):
        """A and B per layer, P only with save_projection; v is written once by the tuner."""
        if name not in self.tinylora_A:
            return []
        names = FACTOR_NAMES + ((PROJECTION,) if self.save_projection[name] else ())
        return [(f"{attr}.{name}", getattr(self, attr)[name]) for attr in names]

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(
                f"Adapter '{name}' is merged into the base weights; call unmerge_adapter() first.")
        for store in (self.tinylora_A, self.tinylora_B, self.tinylora_P):
            if name in store:
                del store[name]
        for per_adapter in (self.r, self.u, self.v_key, self.save_projection):
            per_adapter.pop(name, None)
        if name in self.tinylora_dropout:
            del self.tinylora_dropout[name]
        # the shared dict of vectors is the tuner's to change
        self._active_adapters = [n for n in self._active_adapters if n != name]

    # ------------------------------------------------------------------ math
    def mixing(self, name: str) -> torch.Tensor:
        """R = sum_i v[i] P[i]: (r, r), in v's dtype."""
        v = self.vector(name)
        return torch.einsum("i,ijk->jk", v, self.tinylora_P[name].to(device=v.device, dtype=v.dtype))

    def delta_weight(self, name: str) -> torch.Tensor:
        """B R A (out, in), transposed for a Conv1D's (in, out) weight; float32 products for fp16 / bf16 on
        CPU (slow or missing there), returned in A's dtype."""
        a, b = self.tinylora_A[name], self.tinylora_B[name]
        dtype = torch.float32 if a.device.type == "cpu" and a.dtype in HALF else a.dtype
        r_mat = self.mixing(name).to(device=a.device, dtype=a.dtype)
        delta = b.to(dtype) @ r_mat.to(dtype) @ a.to(dtype)
        delta = delta.T if getattr(self, "fan_in_fan_out", False) else delta
        return delta.to(a.dtype)


class TinyLoraLinear(TinyLoraLayer):
    """`base(x) + ((dropout(x) A^T) R^T) B^T` on an nn.Linear or a Conv1D."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        self.__dict__["fan_in_fan_out"] = is_conv1d(base_layer)  # before nn.Module's setattr is needed
        super().__init__(base_layer, adapter_name, config, **kwargs)

    def weight_2d(self) -> torch.Tensor:
        weight = self.get_base_layer().weight
        return weight.T if self.fan_in_fan_out else weight

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        a, b = self.tinylora_A[name], self.tinylora_B[name]
        # dropout on the input as it comes, then the factors' dtype (the order HF PEFT draws masks in)
        h = self.tinylora_dropout[name](x).to(a.dtype)
        device = h.device
        r_mat = self.mixing(name).to(device=device, dtype=a.dtype)
        return F.linear(F.linear(F.linear(h, a.to(device)), r_mat), b.to(device))


class TinyLoraEmbedding(TinyLoraLayer):
    """`base(ids) + ((dropout(B[ids]) R) A`: B's rows are the low-rank codes of the tokens."""

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        weight = self.get_base_layer().weight  # the factors follow the embeddings' dtype and device
        dtype, device = weight.dtype, weight.device
        a = self.tinylora_A[name].to(device=device, dtype=dtype)
        b = self.tinylora_B[name].to(device=device, dtype=dtype)
        r_mat = self.mixing(name).to(device=device, dtype=dtype)
        codes = self.tinylora_dropout[name](F.embedding(x, b))  # (..., r)
        return (codes @ r_mat) @ a
