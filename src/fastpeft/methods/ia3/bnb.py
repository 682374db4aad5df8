"""(IA)^3 on bitsandbytes Linear4bit / Linear8bitLt (HF PEFT's `ia3.Linear4bit` / `ia3.Linear8bitLt`).

The vector rescales the quantised layer's input (feed-forward targets) or output, as on a dense layer. As HF
PEFT does for these layers, a half-precision input is widened to float32 first (outside autocast), so the
vector is applied at full precision; the result is cast back to the input's dtype (HF PEFT returns it in
float32). Merging multiplies the dequantised weight and requantises it (quant/merge.py; HF PEFT refuses such
merges).
"""

from __future__ import annotations

import torch

from ...quant.merge import QuantisedMerge
from .layer import Linear


class QuantLinear(QuantisedMerge, Linear):
    method_label = "IA3"

    def merged_dense(self, name, weight, bias):
        vector = self.ia3_l[name].detach().float()
        factor = self.bias_factor(name)
        if factor is not None:
            bias = bias * factor.detach().to(bias.dtype)
        return weight * self.weight_factor(vector).to(weight.device), bias

    def adapted_forward(self, x, names, *args, **kwargs):
        vector = self.combined_vector(names)
        if vector is None:
            return self.base_forward(x, *args, **kwargs)
        vector, in_dtype = vector.flatten(), x.dtype
        if not torch.is_autocast_enabled() and in_dtype != torch.float32:
            x = x.float()
        if self.is_feedforward:
            result = self.base_forward(x * vector, *args, **kwargs)
        else:
            result = self.base_forward(x, *args, **kwargs) * vector
        return result.to(in_dtype)


class Linear4bit(QuantLinear):
    """(IA)^3 on bitsandbytes `Linear4bit`."""


class Linear8bitLt(QuantLinear):
    """(IA)^3 on bitsandbytes `Linear8bitLt`."""
