"""SHiRA layers (Bhardwaj et al., 2024, https://arxiv.org/abs/2406.13175) on nn.Linear.

Adapter `name` trains a vector `shira_weight[name]` of n = r * (in + out) values placed at fixed positions
`shira_indices[name]` ((2, n) int32 rows / columns) of the (out, in) weight: dW[rows, cols] = w * scaling.
The positions come from a mask when the adapter is made, and from the file when it is loaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer
from .._shared.random_projections import BufferDict


def check_r(r, target_name: str, n_in: int, n_out: int) -> int:
    """n = r * (in + out) trained entries; refused (naming the layer) unless 0 < n <= in * out."""
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"SHiRA r must be a positive integer, got {r!r} (layer '{target_name}').")
    n = r * (n_in + n_out)
    if n > n_in * n_out:
        raise ValueError(
            f"SHiRA r={r} asks for r * (in + out) = {n} trained entries in layer '{target_name}' "
            f"({n_out}x{n_in} = {n_in * n_out} weights); lower r to at most "
            f"{n_in * n_out // (n_in + n_out)}.")
    return n


def mask_positions(mask: torch.Tensor, n: int, target_name: str, n_in: int, n_out: int) -> torch.Tensor:
    """(2, n) int32 (row, column) positions of the ones of a 0/1 (out, in) mask, in row-major order."""
    if tuple(mask.shape) != (n_out, n_in):
        raise ValueError(f"SHiRA mask_fn returned a mask of shape {tuple(mask.shape)} for layer "
                         f"'{target_name}', whose weight is ({n_out}, {n_in}).")
    rows, cols = torch.where(mask == 1)
    if rows.numel() != n:
        raise ValueError(
            f"SHiRA mask_fn returned {rows.numel()} ones for layer '{target_name}'; it must mark exactly "
            f"r * (in + out) = {n} entries.")
    return torch.stack([rows, cols]).to(torch.int32)


class Linear(AdapterLayer):
    """`base(x) + x @ dW.T`, dW sparse: the trained values at the adapter's saved positions."""

    adapter_param_names = ("shira_weight",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, target_name: str = "") -> None:
        if isinstance(base_layer, AdapterLayer):  # a mixed model's target already wrapped, refused as HF PEFT
            raise ValueError(
                f"SHiRA cannot wrap another method's adapter layer ({type(base_layer).__name__}): in a "
                "PeftMixedModel add the SHiRA adapter before the others on its targets.")
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.fan_in_fan_out = False
        self.shira_weight = nn.ParameterDict()
        self.shira_indices = BufferDict(persistent=False)  # saved through adapter_tensors, as HF PEFT
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        # positions not known yet (a custom mask_type without mask_fn): a load must bring them
        self.positions_pending: dict[str, bool] = {}
        self.update_layer(adapter_name, config, target_name=target_name)

    def update_layer(self, adapter_name: str, config, target_name: str = "", **kwargs) -> None:
        n = check_r(config.r, target_name, self.in_features, self.out_features)
        device = self.base_layer.weight.device
        mask_fn = getattr(config, "mask_fn", None)
        if mask_fn is not None:
            extra = {"random_seed": config.random_seed} if config.mask_type == "random" else {}
            positions = mask_positions(mask_fn(self.base_layer, config.r, **extra), n, target_name,
                                       self.in_features, self.out_features)
        else:
            positions = torch.full((2, n), -1, dtype=torch.int32)
        self.r[adapter_name] = config.r
        self.scaling[adapter_name] = 1.0
        self.positions_pending[adapter_name] = mask_fn is None
        # zeros draw nothing from the global RNG, randn does (as HF PEFT)
        values = torch.zeros(n) if config.init_weights else torch.randn(n)
        self.shira_weight[adapter_name] = nn.Parameter(values)
        self.shira_indices[adapter_name] = positions.to(device)

    def adapter_tensors(self, name: str):
        yield from self.adapter_parameters(name)
        if name in self.shira_indices:
            yield f"shira_indices.{name}", self.shira_indices[name]

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        if name in self.shira_indices:
            del self.shira_indices[name]

    def initial_scaling(self, name: str) -> float:
        return 1.0

    def dense_delta(self, name: str) -> torch.Tensor:
        """The (out, in) weight change: zeros except the trained values at the saved positions (values at a
        repeated position add up, as a sparse COO tensor made dense)."""
        if self.positions_pending.get(name):
            raise ValueError(
                f"SHiRA adapter '{name}' has no mask positions: its mask_type is not 'random' and no "
                "config.mask_fn was set. Set config.mask_fn before get_peft_model, or load a saved adapter.")
        values = self.shira_weight[name] * self.scaling[name]
        rows, cols = self.shira_indices[name].to(values.device).long()
        delta = torch.zeros(self.out_features, self.in_features, dtype=values.dtype, device=values.device)
        return delta.index_put((rows, cols), values, accumulate=True)

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        delta = self.dense_delta(name)
        return F.linear(self.cast_input(x, delta.dtype), delta)

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.dense_delta(name)
