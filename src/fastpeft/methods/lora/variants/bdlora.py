"""BD-LoRA: LoRA with one block-diagonal factor per layer, for tensor-parallel serving (HF PEFT's
`use_bdlora`).

Wang et al. 2025, "Block-Diagonal LoRA for Eliminating Communication Overhead in Tensor Parallel LoRA
Serving": with W sharded over `nblocks` devices, a block-diagonal A (row-sharded layers: o_proj, down_proj) or
a block-diagonal B (column-sharded layers: q/k/v, gate/up) keeps every shard's LoRA update local, so serving
needs no extra all-gather / all-reduce for the adapter.

Storage (as HF PEFT 0.21): the block-diagonal factor keeps only its blocks stacked along the output dimension,
so a block-diagonal A has weight (r, in / nblocks) and a block-diagonal B has weight (out, r / nblocks), under
the usual file keys `lora_A.weight` / `lora_B.weight`. Block k maps input slice k to output slice k.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import modifies_base
from ..subconfig import coerce, register_check
from .base import AdditiveMerge

logger = logging.getLogger(__name__)


@dataclass
class BdLoraConfig:
    """Which targets get a block-diagonal LoRA factor, and how many blocks (HF PEFT 0.21's names and
    defaults).

    target_modules_bd_a / target_modules_bd_b: a target whose full name contains one of these strings gets a
    block-diagonal A (row-sharded layers) / B (column-sharded layers). nblocks: number of diagonal blocks,
    i.e. the tensor-parallel degree used for serving. match_strict: every target must match one of the two
    lists (False lets unmatched targets stay plain LoRA).
    """

    target_modules_bd_a: list[str] | None = field(default=None, metadata={
        "help": "Substrings of target names whose LoRA A is block-diagonal (e.g. ['o_proj', 'down_proj'])."})
    target_modules_bd_b: list[str] | None = field(default=None, metadata={
        "help": "Substrings of target names whose LoRA B is block-diagonal (e.g. ['q_proj', 'up_proj'])."})
    nblocks: int = field(default=1, metadata={"help": "Number of diagonal blocks (the serving shard count)."})
    match_strict: bool = field(default=True, metadata={
        "help": "Refuse targets that match neither list (False: they stay plain LoRA)."})

    def __post_init__(self) -> None:
        overlap = set(self.target_modules_bd_a or []) & set(self.target_modules_bd_b or [])
        if overlap:
            raise ValueError(
                f"BdLoraConfig: {sorted(overlap)} appear in both target_modules_bd_a and "
                "target_modules_bd_b; a layer has either a block-diagonal A or a block-diagonal B, so "
                "list each pattern once.")
        if isinstance(self.nblocks, bool) or not isinstance(self.nblocks, int) or self.nblocks < 1:
            raise ValueError(f"BdLoraConfig.nblocks must be a positive integer, got {self.nblocks!r}.")


def check_config(config) -> None:
    """LoraConfig.use_bdlora as a BdLoraConfig (files hold a dict); refuses options BD-LoRA cannot combine
    with."""
    config.use_bdlora = coerce(config.use_bdlora, BdLoraConfig, "use_bdlora")
    if config.use_bdlora is not None:
        _refuse_inits(config.init_lora_weights)


register_check("use_bdlora", check_config)


def _refuse_inits(init_lora_weights) -> None:
    if modifies_base(init_lora_weights) or init_lora_weights in ("eva", "corda", "loftq", "lora_ga"):
        raise ValueError(
            f"use_bdlora cannot be combined with init_lora_weights={init_lora_weights!r}: BD-LoRA replaces "
            "one factor with a fresh block-diagonal one after that init, which breaks what the init "
            "computed. Use init_lora_weights=True (or 'gaussian' / False).")


class BlockDiagonalLinear(nn.Module):
    """y = blockdiag(W_1, ..., W_n) x with the blocks stacked: weight (out, in / n), block k = rows k*out/n.

    Applied without building the dense matrix: x (..., in) -> (..., n, in/n), each block's slice multiplied by
    its block. `bias` is None (HF PEFT's block-diagonal factor has none).
    """

    def __init__(self, in_features: int, out_features: int, nblocks: int, zero: bool,
                 dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        self.weight = nn.Parameter(torch.empty(out_features, in_features // nblocks,
                                               dtype=dtype, device=device))
        self.bias = None
        if zero:
            nn.init.zeros_(self.weight)
        else:
            nn.init.kaiming_uniform_(self.weight)  # torch's defaults (a=0), as HF PEFT's block factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.nblocks
        blocks = self.weight.view(n, self.out_features // n, -1)  # (n, out/n, in/n)
        xs = x.reshape(*x.shape[:-1], n, self.in_features // n)  # (..., n, in/n)
        return torch.einsum("...ki,koi->...ko", xs, blocks).reshape(*x.shape[:-1], self.out_features)

    def dense(self) -> torch.Tensor:
        """The full (out, in) matrix: blocks on the diagonal, zeros elsewhere."""
        return torch.block_diag(*self.weight.chunk(self.nblocks, dim=0))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}"


def _side(bd: BdLoraConfig, target: str) -> str | None:
    """'A', 'B' or None: which factor of `target` is block-diagonal (patterns match as substrings, as HF
    PEFT)."""
    in_a = any(p in target for p in bd.target_modules_bd_a or [])
    in_b = any(p in target for p in bd.target_modules_bd_b or [])
    if in_a and in_b:
        raise ValueError(f"use_bdlora: target '{target}' matches both target_modules_bd_a and "
                         "target_modules_bd_b; make the patterns select it in one list only.")
    if not (in_a or in_b) and bd.match_strict:
        raise ValueError(
            f"use_bdlora: target '{target}' matches neither target_modules_bd_a nor target_modules_bd_b. Add "
            "a pattern for it, leave it out of target_modules, or set BdLoraConfig(match_strict=False) "
            "to keep it plain LoRA.")
    return "A" if in_a else "B" if in_b else None


class BdLora(AdditiveMerge):
    """BD-LoRA on nn.Linear: y = base(x) + s * B A dropout(x) with A or B block-diagonal (delta s * B_dense
    A_dense)."""

    def init(self, layer, name):
        target = getattr(layer, "target_name", "")
        side = _side(self.config.use_bdlora, target)
        if side is not None:
            _replace_factor(layer, name, side, self.config.use_bdlora.nblocks, target)

    def contribution(self, layer, name, x, result):
        a = layer.lora_A[name]
        # dropout, then the cast (as HF PEFT)
        x = layer.cast_input(layer.lora_dropout[name](x), a.weight.dtype)
        return layer.lora_B[name](a(x)) * layer.scaling[name]

    def delta(self, layer, name):
        a, b = (m.dense() if isinstance(m, BlockDiagonalLinear) else m.weight
                for m in (layer.lora_A[name], layer.lora_B[name]))
        weight = layer.get_base_layer().weight
        if a.device.type == "cpu" and weight.dtype in (torch.float16, torch.bfloat16):
            a, b = a.float(), b.float()  # no half matmul on CPU
        delta = ((b @ a) * layer.scaling[name]).to(weight.dtype)
        return delta.T if layer.fan_in_fan_out else delta  # a Conv1D left plain (match_strict=False)


def _replace_factor(layer, name: str, side: str, nblocks: int, target: str) -> None:
    """Swap the factor on `side` for a block-diagonal one: A drawn with kaiming_uniform_, B zero (as HF
    PEFT)."""
    base = layer.get_base_layer()
    if layer.fan_in_fan_out:
        raise ValueError(
            f"use_bdlora: '{target}' is a transformers Conv1D (weight stored (in, out)); BD-LoRA supports "
            "nn.Linear only (as HF PEFT). Leave it out of target_modules_bd_a / target_modules_bd_b.")
    r = layer.r[name]
    n_in, n_out = (layer.in_features, r) if side == "A" else (r, layer.out_features)
    if n_in % nblocks or n_out % nblocks:
        raise ValueError(
            f"use_bdlora: the block-diagonal LoRA {side} of '{target}' maps {n_in} -> {n_out} features, "
            f"which nblocks={nblocks} does not divide. Pick r (rank_pattern for this layer) and nblocks so "
            "that both feature counts are multiples of nblocks.")
    if side == "B" and layer.lora_bias.get(name):
        raise ValueError(
            f"use_bdlora: lora_bias=True with a block-diagonal LoRA B ('{target}') is not supported: the "
            "block-diagonal factor has no bias. Set lora_bias=False or make A block-diagonal here.")
    weight = base.weight
    dtype = weight.dtype if weight.is_floating_point() else None
    factor = BlockDiagonalLinear(n_in, n_out, nblocks, zero=side == "B", dtype=dtype, device=weight.device)
    (layer.lora_A if side == "A" else layer.lora_B)[name] = factor
