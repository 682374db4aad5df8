"""BOFT layers (Linear, Conv2d): input rotated by a butterfly of orthogonal factors, output scaled per
channel.

Per adapter: `boft_R` (N factors, D blocks, H x H free matrices; each block is the Cayley transform of its
skew part) and `boft_s` (per-output-channel scale), named as in HF PEFT so file keys match. New adapters get
one factor (N = 1) whatever `boft_n_butterfly_factor` says: that is what HF PEFT 0.21.2 builds without its
fbd_cuda extension, i.e. on every CPU machine, so the files load there. Files with N > 1 factors (HF PEFT with
the extension) are loaded with all N: `set_factor_count` rebuilds the adapter first, and the butterfly product
is computed in plain PyTorch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._shared import orthogonal as orth


def _layout_problems(dim: int, size: int, num: int, extra: int, what: str) -> list[tuple[bool, str]]:
    """(failed, message) checks of HF PEFT on a block layout; `extra` = number of butterfly factors - 1."""
    if size == 0:
        return [
            (dim % num != 0, f"{what} ({dim}) must be divisible by boft_block_num ({num})"),
            (extra > 0 and extra > int(math.log2(num)),
             f"boft_n_butterfly_factor ({extra + 1}) is too large for boft_block_num ({num})"),
            (extra > 0 and num % 2**extra != 0,
             f"boft_block_num ({num}) must be a multiple of 2**(boft_n_butterfly_factor - 1) = {2**extra}"),
        ]
    return [
        (dim % size != 0, f"{what} ({dim}) must be divisible by boft_block_size ({size})"),
        (extra > 0 and dim % (size * 2**extra) != 0,
         f"{what} ({dim}) must be a multiple of boft_block_size x 2**(boft_n_butterfly_factor - 1) = "
         f"{size * 2**extra}"),
    ]


def boft_layout(dim: int, size: int, num: int, factors: int, what: str) -> tuple[int, int]:
    """(block_size, block_num) of a rotated dimension `dim` split into blocks of `size` (or into `num` blocks;
    the other is 0) for `factors` butterfly factors, or HF PEFT's refusal as a clear error naming the
    options."""
    extra = factors - 1
    problems = [message for failed, message in _layout_problems(dim, size, num, extra, what) if failed]
    if not problems:
        size, num = (dim // num, num) if size == 0 else (size, dim // size)
        odd = extra > 0 and (num % 2 or size % 2)
        problems = [f"with butterfly factors, boft_block_num ({num}) and boft_block_size "
                    f"({size}) must be even"
                    ] if odd else []
    if problems:
        raise ValueError(f"BOFT: {'; '.join(problems)}. Change boft_block_size / boft_block_num / "
                         "boft_n_butterfly_factor or leave this module out of target_modules.")
    return size, num


class BOFTLayer(orth.RotationLayer):
    additive = False
    adapter_param_names = ("boft_R", "boft_s")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        super().__init__(base_layer)
        self.boft_R = nn.ParameterDict()
        self.boft_s = nn.ParameterDict()
        self.boft_block_size: dict[str, int] = {}
        self.boft_block_num: dict[str, int] = {}
        self.boft_dropout: dict[str, float] = {}
        self.boft_perms: dict[str, list[torch.Tensor]] = {}
        self.rotation_cache: dict[str, tuple] = {}  # eval-time reuse of each adapter's rotation
        self.check_base()
        self.update_layer(adapter_name, config)

    def out_dim(self) -> int:
        raise NotImplementedError

    def scale_shape(self) -> tuple[int, int]:
        return (self.out_dim(), 1)

    def dim_label(self) -> str:
        return f"the input size of {type(self.base_layer).__name__}"

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        dim = self.rotated_dim()
        # one factor and only the divisibility checks, as HF PEFT without fbd_cuda (BOFTModel logs why)
        size, num = boft_layout(dim, config.boft_block_size, config.boft_block_num, 1, self.dim_label())
        blocks = torch.zeros(1, num, size, size)
        scale = torch.ones(self.scale_shape())
        if config.init_weights is False:
            nn.init.normal_(blocks, mean=0.0, std=0.1)
            nn.init.normal_(scale, mean=1.0, std=0.1)
        elif config.init_weights is not True:
            raise ValueError(f"BOFTConfig.init_weights must be True or False, got {config.init_weights!r}.")
        self.boft_R[adapter_name] = nn.Parameter(blocks)
        self.boft_s[adapter_name] = nn.Parameter(scale)
        self.boft_block_size[adapter_name] = size
        self.boft_block_num[adapter_name] = num
        self.boft_dropout[adapter_name] = config.boft_dropout
        self.boft_perms[adapter_name] = orth.butterfly_permutations(dim, num, size, 1)
        self.rotation_cache.pop(adapter_name, None)

    def check_factor_count(self, name: str, factors: int) -> None:
        """Refuse `set_factor_count(name, factors)` where HF PEFT (with fbd_cuda) refuses that many factors
        over the adapter's blocks, or while the adapter is merged."""
        if name in self.merged_adapters:
            raise ValueError(
                f"adapter '{name}' is merged into the base weights; call unmerge_adapter() first")
        size = self.boft_R[name].shape[-1]
        boft_layout(self.rotated_dim(), size, 0, factors, self.dim_label())

    def set_factor_count(self, name: str, factors: int) -> None:
        """Rebuild adapter `name` with `factors` butterfly factors over its (D, H) blocks before a file
        holding that many is copied in. Factors already there are kept and new ones start at zero (identity
        blocks): factor 0's permutation is the identity in every butterfly, so growing keeps the rotation (and
        the outputs, should the load fail after this)."""
        self.check_factor_count(name, factors)
        old = self.boft_R[name]
        _, num, size, _ = old.shape
        blocks = old.detach().new_zeros(factors, num, size, size)
        kept = min(factors, old.shape[0])
        blocks[:kept] = old.detach()[:kept]
        # the same Parameter object takes the new shape: optimizers keep their reference, and a failed load's
        # rollback (checkpoint/keys.py) swaps the old blocks back into it; permutations follow the shape
        torch.utils.swap_tensors(old, nn.Parameter(blocks, requires_grad=old.requires_grad))
        self.rotation_cache.pop(name, None)

    def permutations(self, name: str, factors: int) -> list[torch.Tensor]:
        """The butterfly permutations of adapter `name` for `factors` factors (rebuilt when the count
        changes)."""
        perms = self.boft_perms.get(name)
        if perms is None or len(perms) != factors:
            size = self.boft_R[name].shape[-1]
            dim = self.rotated_dim()
            perms = self.boft_perms[name] = orth.butterfly_permutations(dim, dim // size, size, factors)
        return perms

    # ------------------------------------------------------------------ rotation
    def rotation(self, name: str) -> torch.Tensor:
        """The dense (dim, dim) butterfly rotation of adapter `name` (block dropout applied while
        training)."""
        if self.training and self.boft_dropout[name] > 0:
            return self._rotation(name)
        return orth.cached(self.rotation_cache, name, self.boft_R[name], lambda: self._rotation(name))

    def _rotation(self, name: str) -> torch.Tensor:
        free = self.boft_R[name]
        n_factors, count, size, _ = free.shape
        blocks = orth.cayley(orth.skew_from_square(free.reshape(n_factors * count, size, size)))
        blocks = blocks.reshape(n_factors, count, size, size)
        if self.training and self.boft_dropout[name] > 0:
            blocks = orth.butterfly_block_dropout(blocks, self.boft_dropout[name])
        return orth.butterfly_matrix(blocks, self.permutations(name, n_factors))

    def combined(self, names: list[str], dtype: torch.dtype):
        """(rotation, (out, 1) scale) of the adapters in `names` applied in turn, or None if this layer has
        none."""
        own = [n for n in names if n in self.boft_R]
        if not own:
            return None
        rotation, scale = None, None
        for name in own:
            matrix = self.rotation(name).to(dtype)
            column = self.boft_s[name].reshape(-1, 1).to(dtype)
            rotation = matrix if rotation is None else matrix @ rotation
            scale = column if scale is None else column * scale
        return rotation, scale

    # ------------------------------------------------------------------ merging
    def merge_one(self, name: str, safe_merge: bool) -> None:
        rows = self.weight_rows()
        rotation, scale = self.combined([name], torch.float32)
        merged = (rows.to(torch.float32) @ rotation.T) * scale
        self.store_rows(merged, rows.dtype, name if safe_merge else None)

    def unmerge_one(self, name: str) -> None:
        """Inverse of merge_one: orthogonal rotation -> its transpose, scale -> its reciprocal."""
        rows = self.weight_rows()
        rotation, scale = self.combined([name], torch.float32)
        restored = (rows.to(torch.float32) @ rotation) / scale
        self.store_rows(restored, rows.dtype)


class Linear(BOFTLayer):
    def rotated_dim(self) -> int:
        return self.base_layer.in_features

    def out_dim(self) -> int:
        return self.base_layer.out_features

    def adapted_forward(self, x, names: list[str], *args, **kwargs):
        previous = x.dtype
        parts = self.combined(names, previous)
        if parts is None:
            return self.base_forward(x, *args, **kwargs)
        rotation, scale = parts
        result = self.base_forward(x @ rotation, *args, **kwargs)
        bias = self.base_layer.bias
        if bias is None:
            return (result * scale.squeeze(-1)).to(previous)
        return ((result - bias) * scale.squeeze(-1) + bias).to(previous)


class Conv2d(BOFTLayer):
    """Conv2d: the (out, in * k * k) weight is rotated and scaled, then the convolution runs with it."""

    def check_base(self) -> None:
        base = self.base_layer
        if base.groups > 1 or base.kernel_size[0] != base.kernel_size[1]:
            raise ValueError(f"BOFT supports Conv2d with groups=1 and a square kernel (got {base}); remove "
                             "this module from target_modules.")

    def rotated_dim(self) -> int:
        return orth.conv_rotated_dim(self.base_layer)

    def out_dim(self) -> int:
        return self.base_layer.out_channels

    def scale_shape(self) -> tuple[int, int]:
        return (1, self.out_dim())

    def adapted_forward(self, x, names: list[str], *args, **kwargs):
        previous = x.dtype
        base = self.base_layer
        parts = self.combined(names, base.weight.dtype)
        if parts is None:
            return self.base_forward(x, *args, **kwargs)
        rotation, scale = parts
        weight = ((base.weight.reshape(base.weight.shape[0], -1) @ rotation.T) * scale).reshape(
            base.weight.shape)
        return base._conv_forward(x.to(weight.dtype), weight, base.bias).to(previous)
