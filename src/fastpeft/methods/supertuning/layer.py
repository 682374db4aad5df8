"""Super-Tuning layers: a sparse set of a weight's entries trained, the rest frozen (https://arxiv.org/abs/
2607.09287).

For a (out, in) weight W, n = int(out * in * (1 - sparsity)) flat positions are chosen once, by |W| (top-n, or
bottom-n with select_top=False), and kept as an int32 buffer `supertuning_indices` (n,) (in the files unless
save_precomputed_indices=False). The trained `supertuning_values` (n,) are scattered onto W:

    y = x (W + S)^T + b,   S = scatter(indices, values)   (S[p] = sum of the values at flat position p),

composed into the weight for the matmul as HF PEFT does (not added as a separate term), so a row's output
rounds the same. With r (Supra), a LoRA pair adds (lora_alpha / r) B A x, A (r, in), B (out, r), in float32.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer
from .._shared.random_projections import BufferDict

logger = logging.getLogger(__name__)


def trained_count(numel: int, sparsity: float) -> int:
    """Entries trained in a weight of `numel` entries (HF PEFT's truncation, float rounding included)."""
    return int(numel * (1 - sparsity))


class SupertuningLinear(AdapterLayer):
    """The weight with its sparse trained entries (and an optional LoRA pair) on an nn.Linear."""

    adapter_param_names = ("supertuning_values", "supertuning_lora_A", "supertuning_lora_B")
    # the sparse entries enter the weight itself: mixed batches run adapted_forward per group
    additive = False

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config, target_name: str = "an nn.Linear",
                 **kwargs) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.target_name = target_name
        self.supertuning_values = nn.ParameterDict()
        # persistent (stored in files) as the first adapter's config says; the tuner keeps all adapters alike
        self.supertuning_indices = BufferDict(persistent=config.save_precomputed_indices)
        self.supertuning_lora_A = nn.ModuleDict()
        self.supertuning_lora_B = nn.ModuleDict()
        self.supertuning_lora_dropout = nn.ModuleDict()
        self.supertuning_rank: dict[str, int] = {}
        self.supertuning_lora_alpha: dict[str, float] = {}
        self.update_layer(adapter_name, config)

    # ------------------------------------------------------------------ creation
    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        weight = self.base_layer.weight
        if weight.is_meta:
            raise ValueError(f"Super-Tuning needs the values of the weight of '{self.target_name}' to "
                             "choose its trained entries (by magnitude); load the base model's weights "
                             "first.")
        scores = weight.detach().abs().flatten()
        n = trained_count(scores.numel(), config.sparsity)
        if n < 1:
            raise ValueError(f"SupertuningConfig.sparsity={config.sparsity} leaves no trained entry in "
                             f"'{self.target_name}' ({scores.numel()} weight entries); lower the sparsity.")
        _, indices = torch.topk(scores, k=n, largest=config.select_top)
        self.supertuning_indices[adapter_name] = indices.to(dtype=torch.int32, device=weight.device)
        # the global RNG in HF PEFT's order (values, A's and B's constructors, A, B): a seed gives its values
        make = torch.zeros if config.init_weights else torch.randn
        values = make(n, dtype=torch.float32, device=weight.device)
        self.supertuning_values[adapter_name] = nn.Parameter(values)
        if config.r is None:
            self.supertuning_rank[adapter_name], self.supertuning_lora_alpha[adapter_name] = 0, 0.0
            return
        self.supertuning_rank[adapter_name] = config.r
        self.supertuning_lora_alpha[adapter_name] = float(config.lora_alpha)
        a = nn.Linear(self.in_features, config.r, bias=False, dtype=torch.float32, device=weight.device)
        b = nn.Linear(config.r, self.out_features, bias=False, dtype=torch.float32, device=weight.device)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(b.weight)
        else:
            nn.init.kaiming_uniform_(b.weight, a=math.sqrt(5))
        self.supertuning_lora_A[adapter_name], self.supertuning_lora_B[adapter_name] = a, b
        p = config.lora_dropout
        self.supertuning_lora_dropout[adapter_name] = nn.Dropout(p=p) if p > 0 else nn.Identity()

    def adapter_tensors(self, name: str):
        yield from self.adapter_parameters(name)
        if name in self.supertuning_indices and self.supertuning_indices.persistent:
            yield f"supertuning_indices.{name}", self.supertuning_indices[name]

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        if name in self.supertuning_indices:
            del self.supertuning_indices[name]

    # ------------------------------------------------------------------ the update
    def _with_entries(self, flat: torch.Tensor, name: str, sign: int = 1) -> torch.Tensor:
        """`flat` (the weight flattened) with adapter `name`'s values scattered onto (sign -1: off) it."""
        values = self.supertuning_values[name].to(flat.dtype)
        return flat.scatter_add(0, self.supertuning_indices[name].long(), values if sign > 0 else -values)

    def _lora_delta(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """(out, in): (lora_alpha / r) B A, in `dtype`."""
        scale = self.supertuning_lora_alpha[name] / self.supertuning_rank[name]
        product = self.supertuning_lora_B[name].weight @ self.supertuning_lora_A[name].weight
        return (scale * product).to(dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """(out, in): the scattered values plus the LoRA pair's (lora_alpha / r) B A."""
        weight = self.base_layer.weight
        sparse = self._with_entries(torch.zeros_like(weight).reshape(-1), name).reshape_as(weight)
        return sparse + self._lora_delta(name, weight.dtype) if self.supertuning_rank[name] else sparse

    def _warn_about_base_hooks(self) -> None:
        """The adapted forward calls F.linear with the composed weight, not the base layer, so hooks on the
        base layer do not run (as in HF PEFT): said once per layer."""
        if self.__dict__.get("_hooks_checked"):
            return
        self.__dict__["_hooks_checked"] = True
        base = self.base_layer
        if base._forward_hooks or base._forward_pre_hooks or base._backward_hooks or base._backward_pre_hooks:
            logger.warning("'%s': hooks on its base layer do not run while Super-Tuning adapters are active "
                           "(the composed weight is applied directly); register them on the adapted layer "
                           "instead.", self.target_name)

    def adapted_forward(self, x, names: list[str], *args, **kwargs):
        active = [n for n in names if self.has_adapter(n)]
        if not active:
            return self.base_forward(x, *args, **kwargs)
        self._warn_about_base_hooks()
        weight = self.base_layer.weight
        flat = weight.reshape(-1)
        for name in active:
            flat = self._with_entries(flat, name)
        result = F.linear(x, flat.reshape_as(weight), self.base_layer.bias)
        for name in active:
            if self.supertuning_rank[name]:
                a, b = self.supertuning_lora_A[name], self.supertuning_lora_B[name]
                h = self.supertuning_lora_dropout[name](x).to(a.weight.dtype)
                scale = self.supertuning_lora_alpha[name] / self.supertuning_rank[name]
                result = result + (scale * b(a(h))).to(result.dtype)
        return result

    # ------------------------------------------------------------------ merging (HF PEFT's order of steps)
    def merge_one(self, name: str, safe_merge: bool) -> None:
        weight = self.base_layer.weight
        merged = self._with_entries(weight.data.reshape(-1), name).reshape_as(weight)
        if self.supertuning_rank[name]:
            merged = merged + self._lora_delta(name, weight.dtype)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs detected in the merged weights: Super-Tuning adapter '{name}' on "
                             f"'{self.target_name}' seems to be broken.")
        weight.data = merged

    def unmerge_one(self, name: str) -> None:
        weight = self.base_layer.weight
        data = weight.data
        if self.supertuning_rank[name]:
            data = data - self._lora_delta(name, weight.dtype)
        weight.data = self._with_entries(data.reshape(-1), name, sign=-1).reshape_as(weight)
