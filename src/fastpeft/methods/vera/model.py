"""`VeraModel`: the VeRA tuner (one pair of frozen random matrices per model, drawn with Kaiming-uniform
bounds)."""

from __future__ import annotations

import math

import torch

from ...core.dispatch import DispatchChain
from ...integrations.transformers_defaults import LORA_TARGETS
from .._shared.modules import is_linear
from .._shared.random_projections import ProjectionTuner
from .layer import VeraLinear

DISPATCH = DispatchChain("VeRA")
DISPATCH.register(is_linear, VeraLinear)

# as HF PEFT: LoRA's table, except phi (attention projections only)
VERA_TARGETS: dict[str, list[str]] = {**LORA_TARGETS, "phi": ["q_proj", "v_proj"]}


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-bound, bound) with bound = sqrt(3) * gain / sqrt(fan_in), gain = sqrt(2), fan_in = shape[1] (He et
    al., 2015), drawn from `generator` (the same stream as HF PEFT's VeRA for the same seed)."""
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    with torch.no_grad():
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraModel(ProjectionTuner):
    dispatch = DISPATCH
    projection_names = ("vera_A", "vera_B")
    method_label = "VeRA"
    default_target_table = VERA_TARGETS

    def make_projections(self, config, out_dim: int, in_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A: (r, in_dim) then B: (out_dim, r), from one CPU generator seeded with projection_prng_key."""
        generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
        vera_a = kaiming_uniform((config.r, in_dim), generator)
        vera_b = kaiming_uniform((out_dim, config.r), generator)
        return vera_a, vera_b
