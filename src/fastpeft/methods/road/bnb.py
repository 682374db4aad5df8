"""RoAd on bitsandbytes Linear4bit / Linear8bitLt (HF PEFT's `road.Linear4bit` / `road.Linear8bitLt`).

The forward is the dense layer's: the quantised layer's output is rotated in pairs, and handed back in that
output's dtype (HF PEFT 0.21 returns it in the adapter's dtype, float32, outside autocast). Per-row
adapter_names work as on a dense layer (HF PEFT's bitsandbytes layers pass the keyword on to the base layer,
which rejects it). Merging rotates the rows of the dequantised weight (and the bias) and requantises under the
merge policy (quant/merge.py); unmerging puts the saved quantised weight back exactly, where HF PEFT
requantises the inverse rotation of the already rounded weight.
"""

from __future__ import annotations

from ...quant.merge import QuantisedMerge
from .layer import Linear


class QuantLinear(QuantisedMerge, Linear):
    method_label = "RoAd"

    def merged_dense(self, name, weight, bias):
        diag, cross = self.coefficients(name)
        group_size = self.group_size[name]
        weight = self._rotated(weight, diag.to(weight.device), cross.to(weight.device), group_size)
        if bias is not None:  # float32 here; the merge casts it back to the bias's dtype
            bias = self._rotated(bias, diag.to(bias.device), cross.to(bias.device), group_size)
        return weight, bias


class Linear4bit(QuantLinear):
    """RoAd on bitsandbytes `Linear4bit`."""


class Linear8bitLt(QuantLinear):
    """RoAd on bitsandbytes `Linear8bitLt`."""
