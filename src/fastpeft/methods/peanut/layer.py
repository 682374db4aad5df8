"""PEANuT layers (Zhong et al., 2024, "Parameter-Efficient Adaptation with Weight-aware Neural Tweakers",
https://arxiv.org/abs/2410.01870) on nn.Linear.

The update is a function of the frozen weight W (out, in): its columns W^T (in, out) go through a small
network -- A (out -> r), then `depth` encoders and `depth` decoders (r -> r, each decoder output plus the
matching encoder's input, a U-net style skip), then B (r -> out), with activation f after A and every
encoder / decoder:  dW = scaling * net(W^T)^T, shape (out, in). B starts at zero, so dW = 0 at init.

Because dW depends on W, merging adds dW(W0) to W0 and remembers W0 (on the CPU, as HF PEFT): a second
adapter merged later is computed from W0 too, and unmerging puts W0 back bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...core.layer import AdapterLayer
from .config import activations


def kaiming_(weight: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class PeanutLinear(AdapterLayer):
    """`base(x) + x @ dW(W)^T`."""

    adapter_param_names = ("peanut_A", "peanut_B", "peanut_encoders", "peanut_decoders")
    input_cast_switchable = True  # the only cast of the input goes through `cast_input`

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config, **kwargs) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.peanut_A = nn.ModuleDict()
        self.peanut_B = nn.ModuleDict()
        self.peanut_encoders = nn.ModuleDict()
        self.peanut_decoders = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.depth: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.act_fn: dict[str, str] = {}
        self._weight_before_merge: torch.Tensor | None = None
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        r, depth = config.r, config.depth
        self.r[adapter_name], self.depth[adapter_name] = r, depth
        self.scaling[adapter_name], self.act_fn[adapter_name] = config.scaling, config.act_fn
        # built in HF PEFT's order (each nn.Linear draws its default init), then redrawn below in the same
        # order: one seed gives HF PEFT's factors
        a = nn.Linear(self.out_features, r, bias=False)
        encoders = nn.ModuleList([nn.Linear(r, r, bias=False) for _ in range(depth)])
        decoders = nn.ModuleList([nn.Linear(r, r, bias=False) for _ in range(depth)])
        b = nn.Linear(r, self.out_features, bias=False)
        with torch.no_grad():
            for module in (a, *encoders, *decoders):
                kaiming_(module.weight)
            nn.init.zeros_(b.weight) if config.init_weights else kaiming_(b.weight)
        self.peanut_A[adapter_name], self.peanut_B[adapter_name] = a, b
        self.peanut_encoders[adapter_name], self.peanut_decoders[adapter_name] = encoders, decoders

    # ------------------------------------------------------------------ math
    def delta_from(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """dW (out, in) for base weight `weight` (out, in), in the adapter's dtype."""
        a = self.peanut_A[name]
        act = activations()[self.act_fn[name]]
        h = act(weight.t().to(a.weight.dtype) @ a.weight.t())  # (in, r)
        skips = []
        for encoder in self.peanut_encoders[name]:
            skips.append(h)
            h = act(encoder(h))
        for decoder in self.peanut_decoders[name]:
            h = act(decoder(h)) + skips.pop()  # the innermost encoder's input first
        return (self.peanut_B[name](h) * self.scaling[name]).t()  # (in, out) -> (out, in)

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.delta_from(name, self.base_layer.weight)

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        delta = self.delta_weight(name)
        return self.cast_input(x, delta.dtype) @ delta.t()

    def add_adapters(self, result: torch.Tensor, x: torch.Tensor, names, *args, **kwargs):
        """Each update cast to the output's dtype before it is added: HF PEFT's rounding on half bases."""
        own = self.adapter_names()
        for name in names:
            if name in own:
                result = result + self.adapter_output(name, x).to(result.dtype)
        return result

    # ------------------------------------------------------------------ merging from the pre-merge weight
    def _original_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        if self._weight_before_merge is None:
            self._weight_before_merge = weight.detach().clone().cpu()
        return self._weight_before_merge.to(device=weight.device, dtype=weight.dtype)

    def merge_one(self, name: str, safe_merge: bool) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            merged = weight.data + self.delta_from(name, self._original_weight()).to(weight.dtype)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs or infs in the merged weights: adapter '{name}' seems to be broken.")
        weight.data = merged

    def unmerge_one(self, name: str) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            if self.merged_adapters:  # others stay merged: take this one's update (from W0) back out
                weight.data -= self.delta_from(name, self._original_weight()).to(weight.dtype)
                return
            weight.data.copy_(self._original_weight())  # the last one: W0 exactly
        self._weight_before_merge = None
