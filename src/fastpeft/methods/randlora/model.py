"""`RandLoraModel`: the RandLoRA tuner (shared random bases: dense Kaiming-uniform, sparse or very sparse)."""

from __future__ import annotations

import math

import torch

from ...core.dispatch import DispatchChain
from ...integrations.transformers_defaults import LORA_TARGETS
from ...quant.merge import AllOrNothingMerge, register_quantised
from .._shared.modules import is_linear
from .._shared.random_projections import ProjectionTuner
from . import bnb
from .layer import RandLoraLinear, num_bases

DISPATCH = DispatchChain("RandLoRA")
DISPATCH.register(is_linear, RandLoraLinear)
register_quantised(DISPATCH, bnb.Linear4bit, bnb.Linear8bitLt)  # bitsandbytes layers first


def dense_dtype() -> torch.dtype:
    """HF PEFT draws dense bases in bfloat16 where the accelerator (or CPU) supports it, else float16."""
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _kaiming(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    with torch.no_grad():
        return torch.nn.init.kaiming_uniform_(torch.empty(shape, dtype=dense_dtype()), a=math.sqrt(5),
                                              generator=generator)


def dense_bases(r: int, low: int, high: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A: (r, 1, low), then B: (high, n, r) drawn one (high, 1, r) basis at a time; each scaled to unit
    std."""
    a = _kaiming((r, 1, low), generator)
    b = torch.cat([_kaiming((high, 1, r), generator) for _ in range(num_bases(low, r))], dim=1)
    return a / a.std(), b / b.std()


def _ternary(uniform: torch.Tensor, sparsity: float) -> torch.Tensor:
    """-1 below 1/(2s), +1 above 1 - 1/(2s), 0 elsewhere (Li et al., 2006, very sparse random projections)."""
    out = torch.zeros(uniform.shape)
    out[uniform < 1 / (2 * sparsity)] = -1
    out[uniform > 1 - 1 / (2 * sparsity)] = 1
    return out


def sparse_bases(r: int, low: int, high: int, generator: torch.Generator,
                 sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    a = _ternary(torch.rand((r, 1, low), generator=generator), sparsity)
    b = _ternary(torch.rand((high, num_bases(low, r), r), generator=generator), sparsity)
    return a / a.std(), b / b.std()


class RandLoraModel(AllOrNothingMerge, ProjectionTuner):
    dispatch = DISPATCH
    projection_names = ("randlora_A", "randlora_B")
    method_label = "RandLoRA"
    default_target_table = LORA_TARGETS
    per_layer_file_copies = True

    def make_projections(self, config, out_dim: int, in_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bases for the largest target (out_dim, in_dim), from a CPU generator seeded with
        projection_prng_key."""
        low, high = min(out_dim, in_dim), max(out_dim, in_dim)
        generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
        if config.very_sparse:
            return sparse_bases(config.r, low, high, generator, math.sqrt(low))
        if config.sparse:
            return sparse_bases(config.r, low, high, generator, 3)
        return dense_bases(config.r, low, high, generator)
