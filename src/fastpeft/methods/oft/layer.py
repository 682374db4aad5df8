"""OFT layers: Linear and Conv2d rotate their input, Embedding rotates its output (HF PEFT 0.21.2's forward).

Each adapter is an `OFTRotation` module in `oft_R` (`oft_embedding_R` for embeddings) whose `weight` holds the
upper triangles of the skew-symmetric blocks, so file keys are `...oft_R.weight` as in HF PEFT. Merging
multiplies the base weight by the block-diagonal rotation; unmerging undoes it with a per-block linear solve.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .._shared import orthogonal as orth

logger = logging.getLogger(__name__)


class OFTRotation(nn.Module):
    """The trainable blocks of one OFT adapter on one layer and the rotation they define."""

    def __init__(self, stored: int, block_size: int, count: int, config) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(stored, block_size * (block_size - 1) // 2))
        self.block_size = block_size
        self.count = count  # blocks along the rotated dimension (stored == 1 with block_share)
        self.coft = config.coft
        self.eps = config.eps
        self.neumann_terms = config.neumann_terms
        self.rotation_cache: dict = {}  # eval-time reuse of the blocks (see orthogonal.cached)

    def project(self) -> None:
        """COFT: pull the parameters back into the allowed ball (in place, outside autograd, as HF PEFT)."""
        if self.coft:
            with torch.no_grad():
                self.weight.copy_(orth.project_coft(self.weight, self.block_size, self.eps))

    def blocks(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(count, b, b) orthogonal blocks (computed in `dtype`, e.g. fp32 for half-precision CPU weights)."""
        self.project()

        def compute() -> torch.Tensor:
            weight = self.weight if dtype is None else self.weight.to(dtype)
            rotation = orth.cayley(orth.skew_from_vector(weight, self.block_size), self.neumann_terms)
            return orth.expand_shared(rotation, self.count)

        return orth.cached(self.rotation_cache, str(dtype), self.weight, compute)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return orth.rotate_blocks(x, self.blocks())

    def extra_repr(self) -> str:
        return f"blocks={self.count}, block_size={self.block_size}, coft={self.coft}"


def block_layout(dim: int, r: int, block_size: int, where: str) -> tuple[int, int]:
    """(r, block_size) with r x block_size == dim; the given one is moved to the nearest divisor of dim
    (warned)."""
    if r == 0:
        if dim % block_size or block_size > dim:
            adjusted = orth.nearest_divisor(dim, block_size)
            logger.warning("%s: oft_block_size=%d does not divide %d; using %d.", where,
                           block_size, dim, adjusted)
            block_size = adjusted
        return dim // block_size, block_size
    if dim % r or r > dim:
        adjusted = orth.nearest_divisor(dim, r)
        logger.warning("%s: r=%d does not divide %d; using %d.", where, r, dim, adjusted)
        r = adjusted
    return r, dim // r


class OFTLayer(orth.RotationLayer):
    """Shared parts of the OFT layers; subclasses give the rotated size and how input / weight are rotated."""

    additive = False
    holder_name = "oft_R"
    adapter_param_names = ("oft_R",)
    # merged weight rows: W_k @ R_k^T (input rotation) or W_k @ R_k (embedding output rotation)
    merge_transpose = True

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        super().__init__(base_layer)
        setattr(self, self.holder_name, nn.ModuleDict())
        self.r: dict[str, int] = {}
        self.oft_block_size: dict[str, int] = {}
        self.check_base()
        self.update_layer(adapter_name, config)

    def rotations(self) -> nn.ModuleDict:
        return getattr(self, self.holder_name)

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        where = f"OFT on {type(self.get_base_layer()).__name__}"
        r, block_size = block_layout(self.rotated_dim(), config.r, config.oft_block_size, where)
        module = OFTRotation(1 if config.block_share else r, block_size, r, config)
        if config.init_weights is False:
            nn.init.normal_(module.weight, mean=0.0, std=0.1)
        elif config.init_weights is not True:
            raise ValueError(f"OFTConfig.init_weights must be True or False, got {config.init_weights!r}.")
        self.rotations()[adapter_name] = module
        self.r[adapter_name] = r
        self.oft_block_size[adapter_name] = block_size

    # ------------------------------------------------------------------ merging
    def merge_one(self, name: str, safe_merge: bool) -> None:
        """Each weight row rotated block by block (by R^T for input rotations, R for outputs), in float32."""
        rows = self.weight_rows()
        blocks = self.rotations()[name].blocks(torch.float32)
        merged = orth.rotate_blocks(rows.to(torch.float32), blocks, transpose=self.merge_transpose)
        self.store_rows(merged, rows.dtype, name if safe_merge else None)

    def unmerge_one(self, name: str) -> None:
        rows = self.weight_rows()
        blocks = self.rotations()[name].blocks(torch.float32)
        restored = orth.unrotate_blocks(rows.to(torch.float32), blocks, transpose=self.merge_transpose)
        self.store_rows(restored, rows.dtype)

    # ------------------------------------------------------------------ forward
    def rotate_input(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """x rotated by each adapter in `names` in turn (in the adapter weights' dtype)."""
        own = self.rotations()
        for name in names:
            if name in own:
                module = own[name]
                x = self.rotate(module, x.to(module.weight.dtype))
        return x

    def rotate(self, module: OFTRotation, x: torch.Tensor) -> torch.Tensor:
        return module.rotate(x)

    def adapted_forward(self, x, names: list[str], *args, **kwargs):
        previous = x.dtype
        rotated = self.rotate_input(x, names)
        return self.base_forward(rotated.to(previous), *args, **kwargs).to(previous)


class Linear(OFTLayer):
    def rotated_dim(self) -> int:
        return self.get_base_layer().in_features


class Conv2d(OFTLayer):
    """Conv2d: each kernel-sized input patch (stride 1, no padding) is rotated, then patches are folded
    back."""

    def check_base(self) -> None:
        base = self.get_base_layer()
        kh, kw = base.kernel_size
        problems = {"dilation > 1": base.dilation[0] > 1 or base.dilation[1] > 1,
                    "groups > 1": base.groups > 1, "a non-square kernel": kh != kw}
        found = [what for what, bad in problems.items() if bad]
        if found:
            raise ValueError(f"OFT does not support Conv2d with {', '.join(found)} (got {base}); remove this "
                             "module from target_modules.")

    def rotated_dim(self) -> int:
        return orth.conv_rotated_dim(self.get_base_layer())

    def rotate(self, module: OFTRotation, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        kh, kw = self.get_base_layer().kernel_size
        out_h, out_w = height - kh + 1, width - kw + 1
        patches = F.unfold(x, (kh, kw)).transpose(1, 2).reshape(batch * out_h * out_w, channels * kh * kw)
        rotated = module.rotate(patches)
        # HF PEFT 0.21.2 hands the rotated patches to fold in (channel, row, column, kh, kw) memory order;
        # kept so outputs match its adapters (for kernels > 1 this differs from the merged convolution, as in
        # HF).
        grid = rotated.reshape(batch, out_h, out_w, channels, kh, kw).permute(0, 3, 1, 2, 4, 5)
        grid = grid.reshape(batch, channels * kh * kw, out_h * out_w)
        return F.fold(grid, (height, width), (kh, kw))


class Embedding(OFTLayer):
    """Embedding: the looked-up vectors are rotated (blocks along embedding_dim)."""

    holder_name = "oft_embedding_R"
    adapter_param_names = ("oft_embedding_R",)
    merge_transpose = False

    def rotated_dim(self) -> int:
        return self.get_base_layer().embedding_dim

    def adapted_forward(self, x, names: list[str], *args, **kwargs):
        result = self.base_forward(x, *args, **kwargs)
        return self.rotate_input(result, names).to(result.dtype)
