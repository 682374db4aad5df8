"""AdaLoRA on bitsandbytes Linear4bit / Linear8bitLt (HF PEFT's `adalora.SVDLinear4bit` / `SVDLinear8bitLt`).

The SVD-form update `B diag(E) A x * scaling / ranknum` is added to the quantised layer's output, exactly as
on a dense layer. Merging adds it to the dequantised weight and requantises (quant/merge.py; HF PEFT refuses).
"""

from __future__ import annotations

from ...quant.merge import AdditiveQuantisedMerge
from .layer import SVDLinear


class SVDQuantLinear(AdditiveQuantisedMerge, SVDLinear):
    method_label = "AdaLoRA"


class SVDLinear4bit(SVDQuantLinear):
    """AdaLoRA on bitsandbytes `Linear4bit`."""


class SVDLinear8bitLt(SVDQuantLinear):
    """AdaLoRA on bitsandbytes `Linear8bitLt`."""
