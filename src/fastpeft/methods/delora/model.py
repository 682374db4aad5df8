"""`DeloraModel`: the DeLoRA tuner (nn.Linear targets, rank / lambda patterns, LoRA's default targets)."""

from __future__ import annotations

import torch
from torch import nn

from ...core.dispatch import DispatchChain
from ...core.targeting import pattern_value
from .._shared.tuners import LinearFamilyTuner
from .layer import DeloraLinear

DISPATCH = DispatchChain("DeLoRA")
DISPATCH.register(nn.Linear, DeloraLinear)


class DeloraModel(LinearFamilyTuner):
    """As HF PEFT: LoRA's default targets per model type, 'all-linear' over nn.Linear layers, `bias`."""

    dispatch = DISPATCH

    def layer_kwargs(self, config, key, module):
        return {"target_name": key, "r": pattern_value(config.rank_pattern, key, config.r),
                "delora_lambda": pattern_value(config.lambda_pattern, key, config.delora_lambda)}

    def _place_adapter(self, layer, adapter_name: str, autocast: bool) -> None:
        """The saved column norms follow the adapter's dtype as in HF PEFT: computed in a half-precision
        base's dtype, widened to float32 with autocast_adapter_dtype (so files hold the same dtype)."""
        super()._place_adapter(layer, adapter_name, autocast)
        norms = layer.delora_w_norm
        half = (torch.float16, torch.bfloat16)
        if autocast and adapter_name in norms and norms[adapter_name].dtype in half:
            norms[adapter_name] = norms[adapter_name].float()
