"""AdaLoRA layers: the update is P diag(E) Q in SVD form, `lora_B @ (lora_A * lora_E) * scaling / ranknum`.

`lora_A` (r, in) holds the right singular vectors, `lora_E` (r, 1) the singular values, `lora_B` (out, r) the
left ones. Pruning a triplet zeroes its entry of E; `ranknum` (the starting rank, never trained nor saved)
keeps the scale fixed while entries are pruned (Zhang et al., 2023, eq. 3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer

EPS = 1e-5  # added to ranknum before dividing, as HF PEFT does


class AdaLoraLayer(AdapterLayer):
    """Shared state of the SVD layers; subclasses give the input width and how the update is applied."""

    adapter_param_names = ("lora_A", "lora_B", "lora_E")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int, fan_in_fan_out: bool = False,
                 **kwargs) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.fan_in_fan_out = fan_in_fan_out
        self.update_layer(adapter_name, config, r=r)

    # ---- shapes, given by the base layer
    def dims(self) -> tuple[int, int]:
        """(width of lora_A's rows, height of lora_B's columns)."""
        raise NotImplementedError

    def update_layer(self, adapter_name: str, config, r: int | None = None, **kwargs) -> None:
        r = config.init_r if r is None else r
        n_in, n_out = self.dims()
        ref = self.get_base_layer().weight
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha if config.lora_alpha > 0 else float(r)
        self.lora_dropout[adapter_name] = (nn.Dropout(config.lora_dropout) if config.lora_dropout > 0
                                           else nn.Identity())
        self.lora_A[adapter_name] = nn.Parameter(torch.randn(r, n_in))
        self.lora_E[adapter_name] = nn.Parameter(torch.randn(r, 1))
        self.lora_B[adapter_name] = nn.Parameter(torch.randn(n_out, r))
        self.ranknum[adapter_name] = nn.Parameter(torch.full((1,), float(r), device=ref.device),
                                                  requires_grad=False)
        if config.init_lora_weights:
            self.reset_parameters(adapter_name)

    def reset_parameters(self, name: str) -> None:
        """The paper's init: E = 0 (the adapter starts as the identity), A and B ~ N(0, 0.02^2)."""
        with torch.no_grad():
            nn.init.zeros_(self.lora_E[name])
            nn.init.normal_(self.lora_A[name], mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B[name], mean=0.0, std=0.02)

    def scaled(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """t * scaling / (ranknum + eps), in HF PEFT's order of operations (same rounding, same masks)."""
        return t * self.scaling[name] / (self.ranknum[name] + EPS)

    def svd_product(self, name: str) -> torch.Tensor:
        """B @ diag(E) @ A as an (out, in) matrix."""
        return self.lora_B[name] @ (self.lora_A[name] * self.lora_E[name])

    # ---- rank pruning
    def keep_triplets(self, name: str, keep: list[bool]) -> None:
        """Shrink adapter `name` to the triplets flagged in `keep` (used when loading a pruned adapter).

        ranknum keeps the starting rank (the scale the adapter was trained with); an adapter left with no
        triplet gets ranknum 0, as in HF PEFT.
        """
        if len(keep) != self.r[name]:
            raise ValueError(
                f"rank_pattern has {len(keep)} flags for a layer of rank {self.r[name]} (adapter '{name}'): "
                "the adapter was saved from a model with a different init_r. Load it with the "
                "config it was saved with."
            )
        idx = torch.tensor(keep, dtype=torch.bool, device=self.lora_E[name].device)
        rank = int(idx.sum())
        for holder, sliced in ((self.lora_A, lambda t: t[idx]), (self.lora_E, lambda t: t[idx]),
                               (self.lora_B, lambda t: t[:, idx])):
            old = holder[name]
            holder[name] = nn.Parameter(sliced(old.detach()).clone(), requires_grad=old.requires_grad)
        self.r[name] = rank
        if rank == 0:
            self.ranknum[name].data.zero_()

    def mask_triplets(self, name: str, keep: torch.Tensor) -> None:
        """Zero the singular values of the triplets not in `keep` (a bool vector of length r)."""
        with torch.no_grad():
            self.lora_E[name].masked_fill_(~keep.view(-1, 1).to(self.lora_E[name].device), 0.0)


class SVDLinear(AdaLoraLayer):
    """nn.Linear, or transformers' Conv1D with fan_in_fan_out=True (weight stored (in, out))."""

    def dims(self) -> tuple[int, int]:
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            return base.in_features, base.out_features
        n_in, n_out = base.weight.shape  # Conv1D
        return n_in, n_out

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        a = self.lora_A[name]
        h = self.lora_dropout[name](x.to(a.dtype))
        return self.scaled(name, h @ (a * self.lora_E[name]).T @ self.lora_B[name].T)

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = self.svd_product(name)
        return self.scaled(name, delta.T if self.fan_in_fan_out else delta)


class SVDConv2d(AdaLoraLayer):
    """nn.Conv2d (groups=1): lora_A's rows are flattened (in, kh, kw) filters."""

    def dims(self) -> tuple[int, int]:
        base = self.get_base_layer()
        if base.groups != 1:
            raise ValueError(
                f"AdaLoRA supports only Conv2d layers with groups=1 (this one has groups={base.groups}); "
                "drop it from target_modules (or add it to exclude_modules)."
            )
        kh, kw = base.kernel_size
        return base.in_channels * kh * kw, base.out_channels

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.scaled(name, self.svd_product(name)).reshape(self.get_base_layer().weight.shape)

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        weight = self.delta_weight(name)
        h = self.lora_dropout[name](x.to(weight.dtype))
        return F.conv2d(h, weight, stride=base.stride, padding=base.padding, dilation=base.dilation,
                        groups=base.groups)
