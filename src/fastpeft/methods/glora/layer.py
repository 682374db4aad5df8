"""GLoRA layer for nn.Linear (Chavan et al., "One-for-All: Generalized LoRA for Parameter-Efficient
Fine-tuning", https://arxiv.org/abs/2306.07967).

With W0: (out, in) and b0: (out,), adapter i changes the weight and bias to
    W' = W0 + W0 * A_i + B_i,    b' = b0 + b0 * D_i + E_i + (W0 @ C_i)[:, 0]
(elementwise *, supports broadcast from paths.py). Several adapters each add their change computed against the
original W0 / b0, in forward and in merges alike, as HF PEFT 0.21 does. A merged layer is unmerged by solving
W = W0 (1 + sum A) + sum B for W0 (then the bias likewise), exact up to rounding while 1 + sum A has no zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer
from .paths import bias_support, column_support, weight_support

SUPPORTS = ("glora_A", "glora_B", "glora_C", "glora_D", "glora_E")


class GloraLayer(AdapterLayer):
    adapter_param_names = SUPPORTS

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r: dict[str, int] = {}
        for attr in SUPPORTS:
            setattr(self, attr, nn.ModuleDict())
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        out_f, in_f, r, init = self.out_features, self.in_features, config.r, config.init_weights
        weight = self.get_base_layer().weight
        has_bias = self.bias is not None
        self.r[adapter_name] = r
        # built in HF PEFT's order (A, B, C, D, E): one seed gives the same tensors
        self.glora_A[adapter_name] = weight_support(config.config_A_B, out_f, in_f, r, init, weight)
        self.glora_B[adapter_name] = weight_support(config.config_A_B, out_f, in_f, r, init, weight)
        self.glora_C[adapter_name] = column_support(config.config_C, in_f, r, init, has_bias, weight)
        self.glora_D[adapter_name] = bias_support(config.config_D_E, out_f, init, has_bias, weight)
        self.glora_E[adapter_name] = bias_support(config.config_D_E, out_f, init, has_bias, weight)

    def adapter_tensors(self, name: str):
        """The trained tensors plus the `zeros` buffers of the unused supports (HF PEFT saves them too)."""
        yield from self.adapter_parameters(name)
        for attr in SUPPORTS:
            for bname, buf in getattr(self, attr)[name].named_buffers() if self.has_adapter(name) else ():
                yield f"{attr}.{name}.{bname}", buf

    def supports(self, name: str, like: torch.Tensor) -> list[torch.Tensor]:
        """A, B, C, D, E of adapter `name` on `like`'s device and dtype (as HF PEFT computes them)."""
        return [getattr(self, attr)[name]().to(device=like.device, dtype=like.dtype) for attr in SUPPORTS]

    def deltas(self, name: str, w0: torch.Tensor, b0: torch.Tensor | None):
        """(W' - W0, b' - b0 or None) of adapter `name` against the original weight and bias."""
        a, b, c, d, e = self.supports(name, w0)
        delta_w = w0 * a + b
        if b0 is None:
            return delta_w, None
        return delta_w, b0 * d + e + (w0 @ c).squeeze(-1)

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        delta_w, delta_b = self.deltas(name, base.weight, base.bias)
        return F.linear(x, delta_w, delta_b)

    def delta_weight(self, name: str) -> torch.Tensor:
        base = self.get_base_layer()
        return self.deltas(name, base.weight, base.bias)[0]

    def delta_bias(self, name: str) -> torch.Tensor | None:
        base = self.get_base_layer()
        return self.deltas(name, base.weight, base.bias)[1]

    # ------------------------------------------------------------------ merging (against the original W0)
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = self._active_adapters if adapter_names is None else adapter_names
        new = [n for n in names if self.has_adapter(n) and n not in self.merged_adapters]
        if not new:
            return
        merged = [*self.merged_adapters, *new]
        w0, b0 = self._originals()
        weight, bias = w0.clone(), None if b0 is None else b0.clone()
        for name in merged:
            delta_w, delta_b = self.deltas(name, w0, b0)
            weight += delta_w
            if bias is not None:
                bias += delta_b
        if safe_merge and not all(torch.isfinite(t).all() for t in (weight, bias) if t is not None):
            raise ValueError(f"NaNs or infs in the merged weights: GLoRA adapter(s) {merged} seem broken.")
        self._write(weight, bias)
        self.merged_adapters = merged

    def unmerge(self, adapter_names: list[str] | None = None) -> None:
        """Back to W0 / b0; with `adapter_names`, only those leave (the others are merged again)."""
        leaving = list(self.merged_adapters) if adapter_names is None else [
            n for n in adapter_names if n in self.merged_adapters]
        if not leaving:
            return
        staying = [n for n in self.merged_adapters if n not in leaving]
        self._write(*self._originals())
        self.merged_adapters = []
        if staying:
            self.merge(adapter_names=staying)

    def _originals(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W0 and b0: the current weight and bias, solved back through the merged adapters."""
        base = self.get_base_layer()
        weight, bias = base.weight.data, None if base.bias is None else base.bias.data
        if not self.merged_adapters:
            return weight, bias
        parts = [self.supports(name, weight) for name in self.merged_adapters]
        w0 = (weight - sum(p[1] for p in parts)) / (1.0 + sum(p[0] for p in parts))
        if bias is None:
            return w0, None
        shift = sum(p[4] + (w0 @ p[2]).squeeze(-1) for p in parts)
        return w0, (bias - shift) / (1.0 + sum(p[3] for p in parts))

    def _write(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        base = self.get_base_layer()
        base.weight.data = weight
        if bias is not None:
            base.bias.data = bias


class GloraLinear(GloraLayer):
    """GLoRA on a plain nn.Linear (the only layer type HF PEFT 0.21 adapts with GLoRA)."""
