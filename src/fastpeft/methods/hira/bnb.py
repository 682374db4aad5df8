"""HiRA on bitsandbytes Linear4bit / Linear8bitLt (HF PEFT's `hira.Linear4bit` / `hira.Linear8bitLt`).

The forward is the dense layer's, with W0 the dequantised weight: base(x) + dropout(x) (W0 * B A)^T. Per-row
adapter_names work as on a dense layer. Merging adds W0 * B A to the dequantised weight and requantises
under the merge policy (quant/merge.py), W0 being the weight from before the first merge, so that two
merged adapters give the unmerged outputs (HF PEFT 0.21 multiplies the already merged weight by (1 + B A)
instead). Unmerging puts the saved quantised weight back exactly, where HF PEFT divides by (1 + B A) and
requantises.
"""

from __future__ import annotations

import torch

from ...quant import bnb as qbnb
from ...quant.merge import QuantisedMerge
from .layer import Linear


class QuantLinear(QuantisedMerge, Linear):
    method_label = "HiRA"

    def dense_weight(self) -> torch.Tensor:
        return qbnb.dequantize_weight(self.get_base_layer())

    def _w0(self) -> torch.Tensor:
        """Dense float32 W0: kept from the first merge on; before it, the quantised weight is W0 itself."""
        if self._weight_before_merge is not None:
            return self._weight_before_merge
        return self.dense_weight().float()

    def original_weight(self) -> torch.Tensor:
        return self._w0()

    def merged_dense(self, name, weight, bias):
        w0 = self._w0().to(weight.device)
        return weight + w0 * self.get_delta_weight(name).to(weight.device, torch.float32), bias

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        first = not self.merged_adapters and bool(self._pending(adapter_names))
        if first:
            self._weight_before_merge = self.dense_weight().float().cpu()
        try:
            super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        finally:
            if not self.merged_adapters:
                self._weight_before_merge = None

    def undo_last_merge(self) -> None:
        super().undo_last_merge()
        if not self.merged_adapters:
            self._weight_before_merge = None

    def unmerge(self) -> None:
        super().unmerge()
        self._weight_before_merge = None


class Linear4bit(QuantLinear):
    """HiRA on bitsandbytes `Linear4bit`."""


class Linear8bitLt(QuantLinear):
    """HiRA on bitsandbytes `Linear8bitLt`."""
