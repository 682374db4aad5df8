"""Lily layer for nn.Linear (Zhong et al., "Low-Rank Interconnected Adaptation across Layers",
https://arxiv.org/abs/2407.09946).

For input x (..., in): h = A x with A: (r, in) (an nn.Linear, possibly shared with neighbouring layers);
router weights p = mean over every token of the batch of softmax(R h), R: (num_B, r); the B matrices are one
nn.Linear weight of shape (num_B * r, out) read as (num_B, r, out), mixed into B_p = sum_e p_e B_e: (r, out);
output = base(x) + scaling * h @ B_p. The mixing depends on the whole batch, so the update has no fixed
weight: Lily cannot be merged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer

NOT_MERGEABLE = ("Lily adapters cannot be merged into the base weights: the router mixes the B matrices "
                 "with weights computed from each batch's inputs, so the update is not a fixed weight. Use "
                 "unload() to drop the adapters, or keep the adapted model.")


class LilyLayer(AdapterLayer):
    adapter_param_names = ("lily_A", "lily_B", "lily_router")
    input_cast_switchable = True  # the one input cast goes through `cast_input`

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.initial_scalings: dict[str, float] = {}
        self.stride_A: dict[str, int] = {}
        self.num_B: dict[str, int] = {}
        self.lily_A = nn.ModuleDict()
        self.lily_B = nn.ModuleDict()
        self.lily_router = nn.ModuleDict()
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        r, num_b = config.r, config.num_B
        self.r[adapter_name], self.num_B[adapter_name] = r, num_b
        self.scaling[adapter_name] = self.initial_scalings[adapter_name] = config.scaling
        self.stride_A[adapter_name] = config.stride_A
        # built in HF PEFT's order (A, B, router) and then re-drawn as it does, so that one seed gives the
        # same initial tensors
        self.lily_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lily_B[adapter_name] = nn.Linear(self.out_features, num_b * r, bias=False)
        self.lily_router[adapter_name] = nn.Linear(r, num_b, bias=False)
        self.reset_lily_parameters(adapter_name, config.init_weights)

    def reset_lily_parameters(self, name: str, init_weights: bool = True) -> None:
        nn.init.kaiming_uniform_(self.lily_A[name].weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lily_router[name].weight, a=math.sqrt(5))
        if init_weights:  # B = 0: the adapter starts as the identity
            nn.init.zeros_(self.lily_B[name].weight)
        else:
            nn.init.kaiming_uniform_(self.lily_B[name].weight, a=math.sqrt(5))

    def initial_scaling(self, name: str) -> float:
        return self.initial_scalings[name]

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        a, router = self.lily_A[name], self.lily_router[name]
        hidden = a(self.cast_input(x, a.weight.dtype))  # (..., r)
        num_b = self.num_B[name]
        # router weights averaged over every token of the batch: (num_B,)
        probs = F.softmax(router(hidden), dim=-1).reshape(-1, num_b).mean(dim=0)
        b = self.lily_B[name].weight  # (num_B * r, out)
        combined = torch.einsum("e,eio->io", probs, b.reshape(num_b, -1, b.shape[1]))  # (r, out)
        return torch.matmul(hidden, combined) * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError(NOT_MERGEABLE)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(NOT_MERGEABLE)


class Linear(LilyLayer):
    """Lily on an nn.Linear (the only layer type HF PEFT 0.21 adapts with Lily)."""
