"""RandLoRA on bitsandbytes Linear4bit / Linear8bitLt (HF PEFT's `randlora.Linear4bit` / `Linear8bitLt`).

The update from the shared random bases is added to the quantised layer's output, as on a dense layer. Merging
adds it to the dequantised weight and requantises under the merge policy (quant/merge.py); HF PEFT
requantises without measuring the error.
"""

from __future__ import annotations

from ...quant.merge import AdditiveQuantisedMerge
from .layer import RandLoraLinear


class QuantLinear(AdditiveQuantisedMerge, RandLoraLinear):
    method_label = "RandLoRA"


class Linear4bit(QuantLinear):
    """RandLoRA on bitsandbytes `Linear4bit`."""


class Linear8bitLt(QuantLinear):
    """RandLoRA on bitsandbytes `Linear8bitLt`."""
