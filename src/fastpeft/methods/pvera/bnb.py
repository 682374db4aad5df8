"""PVeRA on bitsandbytes Linear4bit / Linear8bitLt (HF PEFT's `pvera.Linear4bit` / `Linear8bitLt`).

The forward is the dense layer's: the sampled (or mean) update is added to the quantised layer's output.
Merging adds the mean's update to the dequantised weight and requantises under the merge policy
(quant/merge.py); HF PEFT requantises without measuring the error.
"""

from __future__ import annotations

from ...quant.merge import AdditiveQuantisedMerge
from .layer import PveraLinear


class QuantLinear(AdditiveQuantisedMerge, PveraLinear):
    method_label = "PVeRA"


class Linear4bit(QuantLinear):
    """PVeRA on bitsandbytes `Linear4bit`."""


class Linear8bitLt(QuantLinear):
    """PVeRA on bitsandbytes `Linear8bitLt`."""
