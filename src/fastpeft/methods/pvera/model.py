"""`PveraModel`: the PVeRA tuner (one pair of frozen random matrices per model, A drawn with twice the rows
of VeRA's: the latent's mean and log-variance)."""

from __future__ import annotations

import torch
from torch import nn

from ...core.dispatch import DispatchChain
from ...integrations.transformers_defaults import LORA_TARGETS
from ...quant.merge import AllOrNothingMerge, register_quantised
from .._shared.modules import is_linear
from .._shared.random_projections import ProjectionTuner, kaiming_uniform
from . import bnb
from .layer import PveraLinear

DISPATCH = DispatchChain("PVeRA")
DISPATCH.register(is_linear, PveraLinear)
register_quantised(DISPATCH, bnb.Linear4bit, bnb.Linear8bitLt)  # bitsandbytes layers first

# as HF PEFT: LoRA's table, phi's attention projections only, and DINOv2's query / value
PVERA_TARGETS: dict[str, list[str]] = {**LORA_TARGETS, "phi": ["q_proj", "v_proj"],
                                       "dinov2": ["query", "value"]}


class PveraModel(AllOrNothingMerge, ProjectionTuner):
    dispatch = DISPATCH
    projection_names = ("pvera_A", "pvera_B")
    method_label = "PVeRA"
    default_target_table = PVERA_TARGETS

    def make_projections(self, config, out_dim: int, in_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A: (2r, in_dim) then B: (out_dim, r), from one CPU generator seeded with projection_prng_key."""
        generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
        pvera_a = kaiming_uniform((2 * config.r, in_dim), generator)
        pvera_b = kaiming_uniform((out_dim, config.r), generator)
        return pvera_a, pvera_b

    def projection_rank(self, projection_a: torch.Tensor) -> int:
        return projection_a.shape[0] // 2  # A holds the mean's r rows and the log-variance's r rows

    def layer_kwargs(self, config, key: str, module: nn.Module) -> dict:
        return {**super().layer_kwargs(config, key, module), "target_name": key}
