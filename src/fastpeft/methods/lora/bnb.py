"""LoRA on bitsandbytes layers (QLoRA, Dettmers et al. 2023): a frozen 4-bit (nf4 / fp4, optionally double
quantised) or 8-bit base with full-precision A and B, `y = base_q(x) + s B A x`.

Registered first in LoRA's dispatch chain by a matcher that never imports bitsandbytes (quant/bnb.py). Merging
is quant/merge.py's, shared with the other methods: dequantise, add the update (`merged_dense`), requantise,
measure the output error on a probe and refuse when it exceeds the merge policy's bound (HF PEFT requantises
silently); `merge_and_unload(dequantize=True)` merges into dense `nn.Linear` copies instead. Unmerging
restores the saved quantised weight bit-exactly (no second rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...quant import bnb as qbnb
from ...quant.merge import QuantisedMerge, is_bnb_linear
from .layer import Linear

__all__ = ["Linear4bit", "Linear8bitLt", "QuantLinear", "build", "is_bnb_linear", "layer_class"]


class QuantLinear(QuantisedMerge, Linear):
    """LoRA on a bitsandbytes linear layer; the adapter's factors are ordinary `nn.Linear` (same keys as
    HF)."""

    variant_kind = "bnb-linear"  # variants (variants/table.py): DoRA -> dora_bnb.DoraQuant, aLoRA
    method_label = "LoRA"

    def __init__(self, base_layer, adapter_name, config, r, lora_alpha, fan_in_fan_out=False,
                 **kwargs) -> None:
        super().__init__(base_layer, adapter_name, config, r, lora_alpha, fan_in_fan_out=False, **kwargs)
        self.target_name = kwargs.get("target_name", getattr(self, "target_name", ""))

    def feature_sizes(self, base):
        return base.in_features, base.out_features

    @property
    def placement_reference(self) -> torch.Tensor:
        """What new adapter weights follow (Tuner._place_adapter): a 4-bit layer's compute dtype, as HF
        PEFT."""
        return qbnb.placement_reference(self.get_base_layer())

    def dense_weight(self) -> torch.Tensor:
        """The dequantised base weight (out, in)."""
        return qbnb.dequantize_weight(self.get_base_layer())

    def base_path(self, x):
        return F.linear(x, self.dense_weight().to(x.dtype))

    def add_adapters(self, result, x, names, *args, **kwargs):
        out_dtype, own = result.dtype, self.adapter_names()
        for name in names:  # plain LoRA outputs are cast to the base output's dtype one by one (as HF PEFT)
            if name not in own:
                continue
            variant = self.lora_variant.get(name)
            if variant is None:
                result = result + self.adapter_output(name, x).to(out_dtype)
            else:
                result = result + variant.contribution(self, name, x, result)
        return result.to(out_dtype)

    # ------------------------------------------------------------------ merging (quant/merge.py)
    def merged_dense(self, name, weight, bias):
        """W + s B A (DoRA: its own dense merge; aLoRA raises its explanation) and the bias with lora_bias."""
        variant = self.lora_variant.get(name)
        if variant is not None and not hasattr(variant, "merge_dense"):
            variant.merged_weight(self, name)  # aLoRA: never mergeable
        weight = (weight + self.delta_weight(name).float() if variant is None
                  else variant.merge_dense(self, name, weight))
        delta_b = self.delta_bias(name)
        return weight, bias if delta_b is None else bias + delta_b.to(bias.dtype)


class Linear4bit(QuantLinear):
    """LoRA on bitsandbytes `Linear4bit` (HF PEFT's `lora.Linear4bit`)."""


class Linear8bitLt(QuantLinear):
    """LoRA on bitsandbytes `Linear8bitLt` (HF PEFT's `lora.Linear8bitLt`)."""


def layer_class(module) -> type[QuantLinear]:
    return Linear4bit if qbnb.bnb_kind(module) == "4bit" else Linear8bitLt


def build(base_layer, adapter_name, config, **kwargs) -> QuantLinear:
    """Dispatch target: the LoRA class for this bitsandbytes layer's kind."""
    return layer_class(base_layer)(base_layer, adapter_name, config, **kwargs)
