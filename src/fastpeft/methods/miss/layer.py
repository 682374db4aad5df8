"""MiSS layers on nn.Linear (Kang & Yin, "MiSS: Balancing LoRA Performance and Efficiency with Simple Shard
Sharing", https://arxiv.org/abs/2409.15371; formerly "Bone").

Variants (per adapter, from `init_weights`):
- True / False ("balance"): a block D of shape (r, out). The input is cut into r-wide shards (zero-padded)
  that are summed and multiplied by D, i.e. the weight gains D^T tiled along in_features:
  dW[o, i] = D[i % r, o].
- "mini": D of shape (r, mini_r), repeated out / mini_r times along out, then as above.
- "bat": D of shape (out / r, r, r). Every r x r block W_ij of the weight becomes W_ij + W_ij D_i + B_i where
  B_i = D_i, so the update depends on W; unmerging solves W_ij = (W'_ij - D_i) (I + D_i)^-1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def tiled_update(block: torch.Tensor, in_features: int) -> torch.Tensor:
    """dW (out, in) with dW[o, i] = block[i % r, o] for a (r, out) block."""
    r = block.shape[0]
    return block.t().repeat(1, math.ceil(in_features / r))[:, :in_features]


def _blocks(weight: torch.Tensor, r: int) -> torch.Tensor:
    """(out, in) -> (out / r, in / r, r, r): block [i, j] is weight[i r:(i+1) r, j r:(j+1) r]."""
    out_f, in_f = weight.shape
    return weight.reshape(out_f // r, r, in_f // r, r).transpose(1, 2)


def _unblocks(blocks: torch.Tensor) -> torch.Tensor:
    n_out, n_in, r, _ = blocks.shape
    return blocks.transpose(1, 2).reshape(n_out * r, n_in * r)


def bat_merged(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """W_ij -> W_ij (I + D_i) + D_i for each r x r block (the block row i picks D_i)."""
    d = block.unsqueeze(1)  # (out / r, 1, r, r): the same D_i along a block row
    w = _blocks(weight, block.shape[-1])
    return _unblocks(w + w @ d + d)


def bat_unmerged(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(block.shape[-1], device=block.device, dtype=block.dtype)
    inverse = torch.linalg.inv(eye + block).unsqueeze(1)
    w = _blocks(weight, block.shape[-1])
    return _unblocks((w - block.unsqueeze(1)) @ inverse)


class Linear(AdapterLayer):
    adapter_param_names = ("miss_block",)
    additive = False  # 'bat' changes the weight in a weight-dependent way

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config, **kwargs) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.miss_block = nn.ParameterDict()
        self.miss_dropout = nn.ModuleDict()
        self.miss_r: dict[str, int] = {}
        self.miss_mini_r: dict[str, int] = {}
        self.miss_fn: dict[str, bool | str] = {}
        self.update_layer(adapter_name, config, **kwargs)

    def update_layer(self, adapter_name: str, config, target_name: str = "", **kwargs) -> None:
        r, mini_r, variant = config.r, config.mini_r, config.init_weights
        self._check_shapes(r, mini_r, variant, target_name)
        self.miss_r[adapter_name] = r
        self.miss_mini_r[adapter_name] = mini_r
        self.miss_fn[adapter_name] = variant
        self.miss_dropout[adapter_name] = nn.Dropout(config.miss_dropout) if config.miss_dropout > 0 \
            else nn.Identity()
        shape = {"bat": (self.out_features // r, r, r), "mini": (r, mini_r)}.get(
            variant, (r, self.out_features))
        block = torch.zeros(shape)
        if variant is False:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.miss_block[adapter_name] = nn.Parameter(block)

    def _check_shapes(self, r: int, mini_r: int, variant, name: str) -> None:
        where = f"'{name}' (in_features={self.in_features}, out_features={self.out_features})"
        if r > self.in_features:
            raise ValueError(f"MiSS r={r} exceeds in_features of {where}; lower r or leave the module out.")
        if variant == "bat" and (self.in_features % r or self.out_features % r):
            raise ValueError("MiSS init_weights='bat' needs in_features and out_features divisible by "
                             f"r={r}, not so for {where}; pick an r dividing both.")
        if variant == "mini" and self.out_features % mini_r:
            raise ValueError(f"MiSS init_weights='mini' needs out_features divisible by mini_r={mini_r}, not "
                             f"so for {where}; pick another mini_r.")

    # ------------------------------------------------------------------ pieces
    def block(self, name: str) -> torch.Tensor:
        """The (r, out) block of the balance / mini variants (mini's block repeated along out)."""
        block = self.miss_block[name]
        if self.miss_fn[name] == "mini":
            block = block.repeat(1, self.out_features // self.miss_mini_r[name])
        return block

    def shard_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Balance / mini contribution: the sum of the input's r-wide shards times the block."""
        block = self.block(name)
        r = block.shape[0]
        x = self.miss_dropout[name](x.to(block.dtype))
        pad = (-x.shape[-1]) % r
        if pad:
            x = F.pad(x, (0, pad))
        return x.reshape(*x.shape[:-1], x.shape[-1] // r, r).sum(dim=-2) @ block

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return self._changed_weight(name, weight, bat_merged, torch.add)

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return self._changed_weight(name, weight, bat_unmerged, torch.sub)

    def _changed_weight(self, name: str, weight: torch.Tensor, bat_fn, combine) -> torch.Tensor:
        """`weight` in a float32-or-wider dtype with the update applied ('bat': `bat_fn`) or `combine`d with
        dW."""
        block = self.miss_block[name]
        dtype = _work_dtype(block.dtype)
        weight, block = weight.to(dtype), block.to(dtype)
        if self.miss_fn[name] == "bat":
            return bat_fn(weight, block)
        return combine(weight, tiled_update(self.block(name).to(dtype), self.in_features))

    # ------------------------------------------------------------------ forward and merging
    def adapted_forward(self, x, names: list[str], *args, **kwargs):
        own = [n for n in names if n in self.miss_block]
        if not own:
            return self.base_forward(x, *args, **kwargs)
        bat = [n for n in own if self.miss_fn[n] == "bat"]
        if bat:  # bat adapters apply in turn, each to the weight the previous one produced
            weight = self.base_layer.weight
            for name in bat:
                weight = self.merged_weight(name, weight)
            bias = self.base_layer.bias
            result = F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
        else:
            result = self.base_forward(x, *args, **kwargs)
        for name in own:
            if self.miss_fn[name] != "bat":
                result = result + self.shard_output(name, x)
        return result.to(x.dtype)

    def merge_one(self, name: str, safe_merge: bool) -> None:
        value = self.merged_weight(name, self.base_layer.weight.data)
        if safe_merge and not torch.isfinite(value).all():
            raise ValueError(f"NaNs or infs in the merged weights: adapter '{name}' seems to be broken.")
        self.base_layer.weight.data = value.to(self.base_layer.weight.dtype)

    def unmerge_one(self, name: str) -> None:
        value = self.unmerged_weight(name, self.base_layer.weight.data)
        self.base_layer.weight.data = value.to(self.base_layer.weight.dtype)
