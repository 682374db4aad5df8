"""BEFT layers (Huang et al., 2025, https://arxiv.org/abs/2509.15974) on nn.Linear.

Adapter `name` trains a (1, out) vector `beft_bias[name]` added to every output row: y = W x + b + b_name.
Merging adds it to the base layer's bias, so a base layer without a bias cannot merge it.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ...core.layer import AdapterLayer

logger = logging.getLogger(__name__)


class Linear(AdapterLayer):
    """`base(x) + b_name`, b_name of shape (1, out) broadcast over every leading dimension of the output."""

    adapter_param_names = ("beft_bias",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, target_name: str = "") -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.beft_bias = nn.ParameterDict()
        self.update_layer(adapter_name, config, target_name=target_name)

    def update_layer(self, adapter_name: str, config, target_name: str = "", **kwargs) -> None:
        if self.base_layer.bias is None:
            logger.warning("BEFT: layer '%s' has no bias, so adapter '%s' can be trained and used but not "
                           "merged into it.", target_name, adapter_name)
        # drawn even for zero init, so the global RNG advances as in HF PEFT
        values = torch.randn(1, self.out_features)
        if config.init_weights:
            values.zero_()
        self.beft_bias[adapter_name] = nn.Parameter(values)

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The bias broadcast to the output's shape (*x.shape[:-1], out): a view, no copy."""
        return self.beft_bias[name].flatten().expand(*x.shape[:-1], self.out_features)

    def _base_bias(self, name: str) -> torch.Tensor:
        bias = self.base_layer.bias
        if bias is None:
            raise ValueError(f"BEFT cannot merge adapter '{name}': its base layer has no bias to add it to. "
                             "Keep the adapter unmerged (or unload() without merging).")
        return bias

    def delta_bias(self, name: str) -> torch.Tensor:
        return self.beft_bias[name].detach().reshape(-1)

    def merge_one(self, name: str, safe_merge: bool) -> None:
        """Only the base bias changes; the weight is left as it is."""
        bias = self._base_bias(name)
        merged = bias.data + self.delta_bias(name).to(bias.dtype)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs or infs in the merged bias: adapter '{name}' seems to be broken.")
        bias.data = merged

    def unmerge_one(self, name: str) -> None:
        bias = self._base_bias(name)
        bias.data = bias.data - self.delta_bias(name).to(bias.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """BEFT leaves the weight unchanged (zero weight change)."""
        return torch.zeros_like(self.base_layer.weight)
