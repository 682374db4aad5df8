"""Bottleneck adapter layers: a transformer output block (dense -> dropout -> residual + LayerNorm) with
adapters between its dropout and its residual connection.

One adapter (`BottleneckBlock`, the `adapters` library's `Adapter` / `ParallelAdapter` with the same
sub-module names, so AdapterHub tensors map one to one), for hidden states h = dropout(dense(x)) (batch,
seq, hidden) and the block's residual input r:

    sequential: a = pre(h) ; out = up(act(down(a))) * scaling + residual ; LayerNorm(out + r)
    parallel:   out = up(act(down(r))) * scaling ; LayerNorm(h + out + r)

with `pre` (original_ln_before: LayerNorm(h + r)), the residual's origin, the optional new LayerNorms and the
final LayerNorm chosen by the config (config.py). Several active adapters are stacked as the adapters
library's `Stack`: each one's pre-step and block run on the previous one's output, the last one's post-step
closes. The block is non-linear, so it cannot be merged into a weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer
from .architectures import Architecture

# a bottleneck wider than this many times the hidden size is refused (a corrupt reduction_factor)
MAX_EXPANSION = 64


def activation(name: str) -> nn.Module:
    """transformers' ACT2FN module for `name` (what the adapters library uses), or leaky ReLU."""
    if name.lower() == "leakyrelu":
        return _LeakyRelu()
    from transformers.activations import get_activation

    return get_activation(name.lower())


class _LeakyRelu(nn.Module):
    def forward(self, x):
        return F.leaky_relu(x)


def _init_bert(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        module.weight.data.normal_(mean=0.0, std=0.02)
        if module.bias is not None:
            module.bias.data.zero_()
    elif isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)


class BottleneckBlock(nn.Module):
    """One adapter of one output block. Sub-modules as the adapters library names them: `adapter_down`
    (Sequential: [LayerNorm,] Linear, activation), `adapter_up`, `adapter_norm_after`, `gate`, `scaling`."""

    def __init__(self, hidden: int, bottleneck: int, config) -> None:
        super().__init__()
        self.parallel = bool(config.is_parallel)
        self.original_ln_before = config.original_ln_before
        self.original_ln_after = config.original_ln_after
        self.residual_before_ln = config.residual_before_ln
        self.adapter_residual_before_ln = config.adapter_residual_before_ln
        self.use_gating = config.use_gating
        # construction order as the adapters library's, so a seed draws the same default inits
        parts = [nn.LayerNorm(hidden)] if config.ln_before else []
        parts += [nn.Linear(hidden, bottleneck), activation(config.non_linearity)]
        self.adapter_down = nn.Sequential(*parts)
        self.adapter_up = nn.Linear(bottleneck, hidden)
        if isinstance(config.scaling, str):
            self.scaling = nn.Parameter(torch.ones(1 if config.scaling == "learned" else hidden))
        else:
            self.fixed_scaling = float(config.scaling)
        self.adapter_norm_after = nn.LayerNorm(hidden) if config.ln_after else None
        self.gate = nn.Linear(hidden, 1) if config.use_gating else None
        self.dropout = nn.Dropout(p=config.dropout)
        if config.init_weights_seed:
            torch.manual_seed(config.init_weights_seed)
        self._initialise(config.init_weights)

    def _initialise(self, scheme: str) -> None:
        linears = [m for m in self.adapter_down if isinstance(m, nn.Linear)]
        with torch.no_grad():
            if scheme == "bert":
                self.adapter_down.apply(_init_bert)
                self.adapter_up.apply(_init_bert)
            elif scheme == "mam_adapter":  # He et al.: the adapter starts as a no-op
                for linear in linears:
                    nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
                    nn.init.zeros_(linear.bias)
                nn.init.zeros_(self.adapter_up.weight)
                nn.init.zeros_(self.adapter_up.bias)
            else:  # "houlsby": near-identity, truncated N(0, 1e-2)
                for linear in linears + [self.adapter_up]:
                    nn.init.trunc_normal_(linear.weight, mean=0, std=1e-2, a=-2e-2, b=2e-2)
                    nn.init.zeros_(linear.bias)
            if self.gate is not None and scheme != "houlsby":
                self.gate.apply(_init_bert)

    def scale(self):
        return self.scaling if "scaling" in self._parameters else self.fixed_scaling

    def pre(self, h: torch.Tensor, residual_in: torch.Tensor, layer_norm):
        """(adapter input, residual around the adapter) from the block's hidden states h and its residual
        input."""
        if self.parallel:
            return residual_in, residual_in
        residual = h if self.residual_before_ln is True else None
        if self.original_ln_before:
            h = h + residual_in
            if self.residual_before_ln == "post_add":
                residual = h
            h = layer_norm(h)
        if not self.residual_before_ln:
            residual = h
        return h, residual

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.adapter_up(self.adapter_down(x)) * self.scale())
        if self.gate is not None:
            # (batch, seq, 1) -> mean over the sequence -> (batch, 1, 1)
            out = out * torch.sigmoid(self.gate(x)).mean(dim=1).unsqueeze(-1)
        if self.parallel:
            return out if self.adapter_norm_after is None else self.adapter_norm_after(out)
        if self.adapter_residual_before_ln:
            out = out + residual
        if self.adapter_norm_after is not None:
            out = self.adapter_norm_after(out)
        if not self.adapter_residual_before_ln:
            out = out + residual
        return out

    def post(self, out: torch.Tensor, h: torch.Tensor, residual_in: torch.Tensor, layer_norm) -> torch.Tensor:
        """The block's output from the (last) adapter's output; h: the hidden states before any adapter."""
        if self.parallel:
            out = out + h
        if self.original_ln_after:
            out = layer_norm(out + residual_in)
        return out


class BottleneckLayer(AdapterLayer):
    """Wraps a transformer output block; `bottleneck_adapter[name]` is adapter `name`'s `BottleneckBlock`."""

    adapter_param_names = ("bottleneck_adapter",)
    additive = False

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, arch: Architecture, layer: int,
                 location: str, target_name: str = "a block", **kwargs) -> None:
        super().__init__(base_layer)
        self.arch, self.layer_index, self.location, self.target_name = arch, layer, location, target_name
        self.hidden_size = getattr(base_layer, arch.dense).out_features
        self.bottleneck_adapter = nn.ModuleDict()
        self.update_layer(adapter_name, config, layer=layer)

    def update_layer(self, adapter_name: str, config, layer: int | None = None, **kwargs) -> None:
        factor = config.factor_for(self.layer_index if layer is None else layer)
        size = max(1, int(self.hidden_size // factor))
        if size > MAX_EXPANSION * self.hidden_size:
            raise ValueError(f"BottleneckConfig.reduction_factor={factor} gives a bottleneck of {size} for "
                             f"hidden size {self.hidden_size} in '{self.target_name}' (more than "
                             f"{MAX_EXPANSION}x wider): use a factor of at least 1/64.")
        self.bottleneck_adapter[adapter_name] = BottleneckBlock(self.hidden_size, size, config)

    # ------------------------------------------------------------------ forward
    @staticmethod
    def _residual_input(args: tuple, kwargs: dict) -> torch.Tensor:
        return args[0] if args else kwargs["input_tensor"]

    def adapted_forward(self, x, names: list[str], *args, **kwargs):
        residual_in = self._residual_input(args, kwargs)
        base = self.base_layer
        layer_norm = getattr(base, self.arch.layer_norm)
        h = getattr(base, self.arch.dropout)(getattr(base, self.arch.dense)(x))
        blocks = [self.bottleneck_adapter[n] for n in names if n in self.bottleneck_adapter]
        if not blocks:
            return layer_norm(h + residual_in)
        dtype = blocks[-1].adapter_up.weight.dtype
        out_dtype = h.dtype
        norm = _in_dtype_of(layer_norm, dtype)
        h, residual_in = h.to(dtype), residual_in.to(dtype)
        out = h
        for block in blocks:  # the adapters library's Stack
            out, residual = block.pre(out, residual_in, norm)
            out = block(out, residual)
        return blocks[-1].post(out, h, residual_in, norm).to(out_dtype)

    def mixed_forward(self, x, *args, adapter_names: list[str], **kwargs):
        """Each row with its own adapter ("__base__": none): the rows of one adapter run together. The
        residual input is split by rows too (the generic path splits only `x`)."""
        self.check_mixed_batch(x, adapter_names)
        residual_in = self._residual_input(args, kwargs)
        result = self.base_forward(x, residual_in)
        for name in sorted(set(adapter_names) & set(self.bottleneck_adapter)):
            idx = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=result.device)
            rows = self.adapted_forward(x[idx], [name], residual_in[idx])
            result = result.index_copy(0, idx, rows.to(result.dtype))
        return result

    # ------------------------------------------------------------------ merging: refused
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = self._active_adapters if adapter_names is None else adapter_names
        if any(n in self.bottleneck_adapter for n in names):
            raise ValueError(merge_refusal())


def merge_refusal() -> str:
    return ("Bottleneck adapters cannot be merged: the adapter is a non-linear MLP (down-projection, "
            "activation, up-projection) whose output is added before a LayerNorm, so no change of the base "
            "weights reproduces it. Keep the adapter unmerged, or use unload() to remove it.")


def _in_dtype_of(layer_norm: nn.Module, dtype: torch.dtype):
    """The block's LayerNorm applied to tensors of the adapter's `dtype` (a half-precision base keeps its
    LayerNorm in its own dtype; float32 adapters meet it there)."""
    weight = getattr(layer_norm, "weight", None)
    if weight is None or weight.dtype == dtype:
        return layer_norm
    return lambda t: layer_norm(t.to(weight.dtype)).to(dtype)
