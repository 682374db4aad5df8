"""HiRA layers: the frozen weight modulated elementwise by a trained rank-r product.

Huang et al., "HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large Language Models" (ICLR 2025,
https://openreview.net/pdf?id=TwJrTz9cRS). For a weight W0 and factors A, B the adapted weight is

    W = W0 + W0 * (B A)        (* the Hadamard product)

so the update's rank is bounded by rank(W0) * r, not by r (eq. 4 of the paper). Shapes per layer kind:
- nn.Linear / Conv1D: A (r, in), B (out, r); B A is (out, in), transposed for Conv1D's (in, out) storage.
- nn.Embedding (num, dim): A (r, num), B (dim, r); (B A)^T is (num, dim).
- nn.ConvNd: A (r, in, *kernel), B (out, r, 1, ...); (B A)[o, i, *k] = sum_j B[o, j] A[j, i, *k].
The forward never changes W0: it adds the base layer's own operation (no bias) run with W0 * (B A).

Because the update depends on W0, a merge keeps W0 (on the CPU, as HF PEFT): every adapter merged later is
computed from W0, and unmerging the last one puts W0 back bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer
from .._shared.modules import is_conv1d, linear_dims


def check_rank(r, target_name: str) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"HiRA r must be a positive integer, got {r!r} for '{target_name}' (r or its "
                         "rank_pattern entry).")


def dropout_module(p: float) -> nn.Module:
    return nn.Dropout(p=p) if p > 0 else nn.Identity()


class HiraLayer(AdapterLayer):
    """What every HiRA layer shares: the factors, the merge from the kept W0, HF PEFT's `get_delta_weight`.

    A subclass names its factor dicts (`adapter_param_names`, A first), builds them in `update_layer` and
    gives `modulated_output(name, x, weight)`: its base operation, without bias, run with `weight`."""

    input_cast_switchable = True  # the only cast of the input goes through `cast_input`

    def __init__(self, base_layer: nn.Module, target_name: str) -> None:
        super().__init__(base_layer)
        self.target_name = target_name
        self.r: dict[str, int] = {}
        self.hira_dropout = nn.ModuleDict()
        self._weight_before_merge: torch.Tensor | None = None

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        a_attr, b_attr = self.adapter_param_names
        return getattr(self, a_attr)[name], getattr(self, b_attr)[name]

    def factor_product(self, name: str) -> torch.Tensor:
        """B A in the layout of the base weight, in the adapter's dtype."""
        raise NotImplementedError

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """HF PEFT's meaning: B A (the modulation, laid out as the base weight), not the additive change.
        On the CPU half-precision factors are multiplied in float32, as HF PEFT (slow half matmuls there)."""
        a, _ = self.factors(name)
        if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
            with torch.no_grad():
                return self._float_product(name).to(a.dtype)
        return self.factor_product(name)

    def _float_product(self, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        saved = a.data, b.data
        a.data, b.data = a.data.float(), b.data.float()
        try:
            return self.factor_product(name)
        finally:
            a.data, b.data = saved

    def delta_weight(self, name: str) -> torch.Tensor:
        """The additive change W0 * (B A), W0 being the weight from before any merge."""
        weight = self.original_weight()
        return weight * self.get_delta_weight(name).to(weight.dtype)

    def dense_weight(self) -> torch.Tensor:
        """W0 as a dense tensor in the base weight's layout (dequantised on bitsandbytes layers)."""
        return self.base_layer.weight

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        a, _ = self.factors(name)
        x = self.hira_dropout[name](self.cast_input(x, a.dtype))
        return self.modulated_output(name, x, self.dense_weight() * self.factor_product(name))

    def modulated_output(self, name: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ merging from the pre-merge weight
    def original_weight(self) -> torch.Tensor:
        """W0: the weight as it was before the first merge (kept on the CPU while merged)."""
        weight = self.base_layer.weight
        if self._weight_before_merge is None:
            return weight.detach()
        return self._weight_before_merge.to(device=weight.device, dtype=weight.dtype)

    def merge_one(self, name: str, safe_merge: bool) -> None:
        weight = self.base_layer.weight
        if self._weight_before_merge is None:
            self._weight_before_merge = weight.detach().clone().cpu()
        with torch.no_grad():
            merged = weight.data + self.delta_weight(name)
        if safe_merge and not torch.isfinite(merged).all():
            if not self.merged_adapters:
                self._weight_before_merge = None
            raise ValueError(f"NaNs or infs in the merged weights: HiRA adapter '{name}' seems to be broken.")
        weight.data = merged

    def unmerge_one(self, name: str) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            if self.merged_adapters:  # others stay merged: take this one's update (from W0) back out
                weight.data -= self.delta_weight(name)
                return
            weight.data.copy_(self.original_weight())  # the last one: W0 exactly
        self._weight_before_merge = None


class Linear(HiraLayer):
    """`base(x) + dropout(x) (W0 * B A)^T` on an nn.Linear or a transformers Conv1D."""

    adapter_param_names = ("hira_A", "hira_B")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int | None = None,
                 target_name: str = "a linear layer", **kwargs) -> None:
        super().__init__(base_layer, target_name)
        self.in_features, self.out_features = linear_dims(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)  # Conv1D stores its weight (in, out)
        self.hira_A = nn.ParameterDict()
        self.hira_B = nn.ParameterDict()
        self.update_layer(adapter_name, config, r=r)

    def update_layer(self, adapter_name: str, config, r: int | None = None, **kwargs) -> None:
        r = config.r if r is None else r
        check_rank(r, self.target_name)
        init = config.init_weights
        if init and not (init is True or init.lower() == "gaussian"):
            raise ValueError(f"HiRA init_weights={init!r} is not known (True, False or 'gaussian').")
        # drawn in HF PEFT's order (A, B, then the init of A): one seed gives HF PEFT's factors
        a, b = torch.randn(r, self.in_features), torch.randn(self.out_features, r)
        if init:
            if init is True:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            else:
                nn.init.normal_(a, std=1 / r)
            nn.init.zeros_(b)
        self.r[adapter_name] = r
        self.hira_dropout[adapter_name] = dropout_module(config.hira_dropout)
        self.hira_A[adapter_name] = nn.Parameter(a)
        self.hira_B[adapter_name] = nn.Parameter(b)

    def factor_product(self, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        product = b @ a  # (out, in)
        return product.T if self.fan_in_fan_out else product

    def modulated_output(self, name: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight.T if self.fan_in_fan_out else weight)


class Embedding(HiraLayer):
    """`base(ids) + (W0 * (B A)^T)[ids]` on an nn.Embedding (no dropout and no padding / max_norm options on
    the adapter's lookup, as HF PEFT)."""

    adapter_param_names = ("hira_embedding_A", "hira_embedding_B")

    def __init__(self, base_layer: nn.Embedding, adapter_name: str, config, r: int | None = None,
                 target_name: str = "an nn.Embedding", **kwargs) -> None:
        super().__init__(base_layer, target_name)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.hira_embedding_A = nn.ParameterDict()
        self.hira_embedding_B = nn.ParameterDict()
        self.update_layer(adapter_name, config, r=r)

    def update_layer(self, adapter_name: str, config, r: int | None = None, **kwargs) -> None:
        r = config.r if r is None else r
        check_rank(r, self.target_name)
        a, b = torch.randn(r, self.in_features), torch.randn(self.out_features, r)
        if config.init_weights is not False:  # HF PEFT: A zeros, B normal for True, None and 'gaussian'
            nn.init.zeros_(a)
            nn.init.normal_(b)
        self.r[adapter_name] = r
        self.hira_dropout[adapter_name] = dropout_module(config.hira_dropout)  # kept, unused, as HF PEFT
        self.hira_embedding_A[adapter_name] = nn.Parameter(a)
        self.hira_embedding_B[adapter_name] = nn.Parameter(b)

    def factor_product(self, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        return (b @ a).T  # (num, dim)

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return F.embedding(x, self.base_layer.weight * self.factor_product(name))


class _ConvNd(HiraLayer):
    """`base(x) + conv(dropout(x), W0 * B A)` (the base's stride, padding, dilation; no bias)."""

    adapter_param_names = ("hira_A", "hira_B")
    conv_fn = None  # F.conv1d / conv2d / conv3d, set per subclass

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int | None = None,
                 target_name: str = "a convolution", **kwargs) -> None:
        check_convolution(base_layer, target_name)
        super().__init__(base_layer, target_name)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self.hira_A = nn.ParameterDict()
        self.hira_B = nn.ParameterDict()
        self.update_layer(adapter_name, config, r=r)

    def update_layer(self, adapter_name: str, config, r: int | None = None, **kwargs) -> None:
        r = config.r if r is None else r
        check_rank(r, self.target_name)
        base = self.base_layer
        ones = (1,) * len(base.kernel_size)
        a = torch.randn(r, self.in_features, *base.kernel_size)
        b = torch.randn(self.out_features, r, *ones)
        if config.init_weights:  # HF PEFT: 'gaussian' initialises convolutions as True does
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)
        self.r[adapter_name] = r
        self.hira_dropout[adapter_name] = dropout_module(config.hira_dropout)
        self.hira_A[adapter_name] = nn.Parameter(a)
        self.hira_B[adapter_name] = nn.Parameter(b)

    def factor_product(self, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        product = b.flatten(1) @ a.flatten(1)  # (out, r) @ (r, in * prod(kernel))
        return product.view(self.out_features, *a.shape[1:])

    def modulated_output(self, name: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return type(self).conv_fn(x, weight, None, base.stride, base.padding, base.dilation, base.groups)


def check_convolution(base: nn.Module, target_name: str) -> None:
    """Refused before anything is built: grouped convolutions (W0 is (out, in / groups, *k) there, which a
    product B A of full channel counts does not fit; HF PEFT 0.21 refuses them too) and padding modes other
    than zeros (HF PEFT pads the adapter's convolution with zeros whatever the base does, so its merged and
    unmerged outputs differ)."""
    if base.groups != 1:
        raise NotImplementedError(
            f"HiRA cannot adapt '{target_name}': {type(base).__name__} with groups={base.groups} (the B A "
            "product has the full channel counts, the grouped weight does not). Leave it out of "
            "target_modules.")
    if base.padding_mode != "zeros":
        raise NotImplementedError(
            f"HiRA cannot adapt '{target_name}': padding_mode={base.padding_mode!r} (HF PEFT 0.21 pads the "
            "adapter's convolution with zeros, so merged and unmerged outputs would differ). Leave it out of "
            "target_modules.")


class Conv1d(_ConvNd):
    conv_fn = staticmethod(F.conv1d)


class Conv2d(_ConvNd):
    conv_fn = staticmethod(F.conv2d)


class Conv3d(_ConvNd):
    conv_fn = staticmethod(F.conv3d)
