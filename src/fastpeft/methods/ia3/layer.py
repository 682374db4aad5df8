"""(IA)^3 layers: one learned vector per adapter rescales a layer's output, or its input for feed-forward
targets.

Liu et al., 2022 (https://arxiv.org/abs/2205.05638): y = l * (W x + b) for keys / values, y = W (l * x) + b
for the feed-forward down projection. Several active adapters multiply their vectors. Merging multiplies the
weight's rows (output) or columns (input) by the vector, and the bias too for output vectors; unmerging
divides again.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ...core.layer import AdapterLayer

logger = logging.getLogger(__name__)

# added to the divisor on unmerge, as HF PEFT does, so both libraries restore bit-identical weights
UNMERGE_EPS = 1e-8


class IA3Layer(AdapterLayer):
    """Shared state and merge logic; subclasses give the vector's shape and how it lines up with the
    weight."""

    adapter_param_names = ("ia3_l",)
    additive = False

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, is_feedforward: bool = False,
                 fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        # decided by the first adapter; later adapters on this layer share it (their vectors have its shape)
        self.is_feedforward = is_feedforward
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = self.feature_sizes(base_layer)
        self.update_layer(adapter_name, config, is_feedforward=is_feedforward)

    # ------------------------------------------------------------------ per layer type
    @staticmethod
    def feature_sizes(base_layer: nn.Module) -> tuple[int, int]:
        raise NotImplementedError

    def vector_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def weight_factor(self, vector: torch.Tensor) -> torch.Tensor:
        """`vector` shaped to multiply `base_layer.weight` elementwise."""
        raise NotImplementedError

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, config, is_feedforward: bool | None = None, **kwargs) -> None:
        if is_feedforward is not None and is_feedforward != self.is_feedforward:
            logger.warning(
                "IA3 adapter '%s' treats this layer as %s, but its first adapter made it %s; the layer keeps "
                "its first role (as HF PEFT).", adapter_name, _role(is_feedforward),
                _role(self.is_feedforward))
        vector = torch.randn(self.vector_shape())
        if config.init_ia3_weights:
            vector = torch.ones_like(vector)
        self.ia3_l[adapter_name] = nn.Parameter(vector)

    def combined_vector(self, names) -> torch.Tensor | None:
        """Product of the vectors of the adapters in `names` this layer has (None: none of them)."""
        vectors = [self.ia3_l[n] for n in names if n in self.ia3_l]
        if not vectors:
            return None
        product = vectors[0]
        for vector in vectors[1:]:
            product = product * vector
        return product

    # ------------------------------------------------------------------ merging
    def bias_factor(self, name: str) -> torch.Tensor | None:
        """Output vectors rescale the bias too; input vectors leave it as it is."""
        bias = self.bias
        if self.is_feedforward or bias is None:
            return None
        return self.ia3_l[name].reshape(bias.shape)

    def _scaled(self, name: str, divide: bool) -> list[tuple[nn.Parameter, torch.Tensor]]:
        base = self.get_base_layer()
        pairs = [(base.weight, self.weight_factor(self.ia3_l[name].detach()))]
        bias_factor = self.bias_factor(name)
        if bias_factor is not None:
            pairs.append((base.bias, bias_factor.detach()))
        if divide:
            return [(p, p.data / (f + UNMERGE_EPS)) for p, f in pairs]
        return [(p, p.data * f) for p, f in pairs]

    def merge_one(self, name: str, safe_merge: bool) -> None:
        updates = self._scaled(name, divide=False)
        if safe_merge and not all(torch.isfinite(value).all() for _, value in updates):
            raise ValueError(f"NaNs or infs in the merged weights: IA3 adapter '{name}' seems to be broken.")
        for param, value in updates:
            param.data = value.to(param.dtype)

    def unmerge(self) -> None:
        # checked first, so a refusal leaves the layer merged and consistent
        for name in self.merged_adapters:
            vector = self.ia3_l[name].detach()
            zeros = int(((vector == 0) | (vector + UNMERGE_EPS == 0)).sum())
            if zeros:
                raise ValueError(
                    f"Cannot unmerge IA3 adapter '{name}' from {type(self.base_layer).__name__}"
                    f"({self.in_features}, {self.out_features}): its vector has {zeros} zero entries, so "
                    "merging erased those weights and dividing cannot restore them. Reload the base model "
                    "instead (and merge such an adapter only with merge_and_unload)."
                )
        super().unmerge()

    def unmerge_one(self, name: str) -> None:
        for param, value in self._scaled(name, divide=True):
            param.data = value.to(param.dtype)


def _role(is_feedforward: bool) -> str:
    return "feed-forward (input scaled)" if is_feedforward else "output scaled"


class Linear(IA3Layer):
    """nn.Linear (weight (out, in)) and transformers' Conv1D (weight (in, out): `fan_in_fan_out`)."""

    @staticmethod
    def feature_sizes(base_layer: nn.Module) -> tuple[int, int]:
        if isinstance(base_layer, nn.Linear):
            return base_layer.in_features, base_layer.out_features
        weight = base_layer.weight
        n_in, n_out = getattr(weight, "ds_shape", weight.shape)
        return n_in, n_out

    def vector_shape(self) -> tuple[int, ...]:
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    def weight_factor(self, vector: torch.Tensor) -> torch.Tensor:
        return vector.T if self.fan_in_fan_out else vector

    def adapted_forward(self, x, names, *args, **kwargs):
        vector = self.combined_vector(names)
        if vector is None:
            return self.base_forward(x, *args, **kwargs)
        vector = vector.flatten()
        if self.is_feedforward:
            scaled = (x.to(vector.dtype) * vector).to(x.dtype)
            return self.base_forward(scaled, *args, **kwargs)
        result = self.base_forward(x, *args, **kwargs)
        return (result * vector).to(result.dtype)


class Conv(IA3Layer):
    """nn.Conv2d / nn.Conv3d: the vector has shape (1, channels, 1, ...) and scales the channel axis."""

    @staticmethod
    def feature_sizes(base_layer: nn.Module) -> tuple[int, int]:
        return base_layer.in_channels, base_layer.out_channels

    def vector_shape(self) -> tuple[int, ...]:
        channels = self.in_features if self.is_feedforward else self.out_features
        return (1, channels) + (1,) * (self.base_layer.weight.dim() - 2)

    def weight_factor(self, vector: torch.Tensor) -> torch.Tensor:
        """Output vector: one factor per filter. Input vector: per input channel; a grouped convolution's
        filters see only their group's channels, so each filter gets its group's slice of the vector."""
        if not self.is_feedforward:
            return vector.transpose(0, 1)
        base = self.get_base_layer()
        if base.groups == 1:
            return vector
        groups, per_in, per_out = (base.groups, base.in_channels // base.groups,
                                   base.out_channels // base.groups)
        spatial = vector.shape[2:]
        sliced = vector.reshape(groups, 1, per_in, *spatial).expand(groups, per_out, per_in, *spatial)
        return sliced.reshape(base.out_channels, per_in, *spatial)

    def adapted_forward(self, x, names, *args, **kwargs):
        vector = self.combined_vector(names)
        if vector is None:
            return self.base_forward(x, *args, **kwargs)
        in_dtype = x.dtype
        if self.is_feedforward:
            scaled = (x.to(vector.dtype) * vector).to(self.get_base_layer().weight.dtype)
            return self.base_forward(scaled, *args, **kwargs).to(in_dtype)
        result = self.base_forward(x, *args, **kwargs)
        return (result.to(vector.dtype) * vector).to(in_dtype)
