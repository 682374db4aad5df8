"""LoRA on bitsandbytes layers (QLoRA, Dettmers et al. 2023): a frozen 4-bit (nf4 / fp4, optionally double
quantised) or 8-bit base with full-precision A and B, `y = base_q(x) + s B A x`.

Registered first in LoRA's dispatch chain by a matcher that never imports bitsandbytes (quant/bnb.py). Merging
dequantises the base, adds the update, requantises, measures the output error on a probe and refuses when it
exceeds the merge policy's bound (HF PEFT requantises silently); `merge_and_unload(dequantize=True)` merges into
dense `nn.Linear` copies instead. Unmerging restores the saved quantised weight bit-exactly (no second rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...quant import bnb as qbnb
from .layer import Linear


def is_bnb_linear(module) -> bool:
    """bitsandbytes Linear4bit / Linear8bitLt (checked by class module: bitsandbytes is not imported)."""
    return qbnb.bnb_kind(module) is not None


class QuantLinear(Linear):
    """LoRA on a bitsandbytes linear layer; the adapter's factors are ordinary `nn.Linear` (same keys as HF)."""

    variant_kind = "bnb-linear"  # variants (variant_table.py): DoRA -> bnb_dora.DoraQuant, aLoRA

    def __init__(self, base_layer, adapter_name, config, r, lora_alpha, fan_in_fan_out=False, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, config, r, lora_alpha, fan_in_fan_out=False, **kwargs)
        self.target_name = kwargs.get("target_name", getattr(self, "target_name", ""))
        self._snapshots: list[tuple[int, qbnb.WeightSnapshot]] = []  # (merged count before, weight) per merge
        self.last_merge_error: qbnb.QuantError | None = None

    def feature_sizes(self, base):
        return base.in_features, base.out_features

    @property
    def placement_reference(self) -> torch.Tensor:
        """What new adapter weights follow (Tuner._place_adapter): a 4-bit layer's compute dtype, as HF PEFT."""
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

    # ------------------------------------------------------------------ merging
    def _names_to_merge(self, adapter_names) -> list[str]:
        names = self._active_adapters if adapter_names is None else adapter_names
        own = self.adapter_names()
        return [n for n in names if n in own and n not in self.merged_adapters]

    def _merge_target(self, names: list[str], safe_merge: bool):
        """(dense merged weight in float32, merged bias or None, the added update) for adapters `names`."""
        start = self.dense_weight().float()
        weight, bias = start, self.get_base_layer().bias
        bias = None if bias is None else bias.data
        for name in names:
            variant = self.lora_variant.get(name)
            if variant is not None and not hasattr(variant, "merge_dense"):
                variant.merged_weight(self, name)  # aLoRA: never mergeable; this raises its explanation
            weight = (weight + self.delta_weight(name).float() if variant is None
                      else variant.merge_dense(self, name, weight))
            delta_b = self.delta_bias(name)
            if delta_b is not None:
                bias = bias + delta_b.to(bias.dtype)
        if safe_merge and not all(torch.isfinite(t).all() for t in (weight, bias) if t is not None):
            raise ValueError(f"NaNs or infs in the merged weights: adapter(s) {names} seem to be broken.")
        return weight, bias, weight - start

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = self._names_to_merge(adapter_names)
        if not names:
            return
        base = self.get_base_layer()
        target, bias, delta = self._merge_target(names, safe_merge)
        param = qbnb.quantized_param(base, target)
        error = qbnb.measure_error(target, qbnb.dequantize_param(base, param), delta)
        qbnb.enforce(error, f"layer '{self.target_name or type(base).__name__}' (adapters {names})")
        self._snapshots.append((len(self.merged_adapters), qbnb.snapshot(base)))
        qbnb.install_weight(base, param)
        if bias is not None:
            base.bias.data = bias
        self.merged_adapters.extend(names)
        self.last_merge_error = error

    def undo_last_merge(self) -> None:
        """Take back the latest `merge` call (restores the weight it replaced)."""
        count, saved = self._snapshots.pop()
        qbnb.restore(self.get_base_layer(), saved)
        del self.merged_adapters[count:]

    def unmerge(self) -> None:
        """Restore the quantised weight from before the first merge (exact; nothing is requantised)."""
        if self._snapshots:
            qbnb.restore(self.get_base_layer(), self._snapshots[0][1])
        self._snapshots.clear()
        self.merged_adapters.clear()

    def unloaded(self, merge, safe_merge=False, adapter_names=None):
        if not (merge and qbnb.current_policy().dequantize):
            return super().unloaded(merge, safe_merge=safe_merge, adapter_names=adapter_names)
        base = self.get_base_layer()
        weight, bias, _ = self._merge_target(self._names_to_merge(adapter_names), safe_merge)
        dense = qbnb.dense_linear(base, weight)
        if bias is not None:
            dense.bias.data = bias.to(dense.weight.dtype)
        return dense


class Linear4bit(QuantLinear):
    """LoRA on bitsandbytes `Linear4bit` (HF PEFT's `lora.Linear4bit`)."""


class Linear8bitLt(QuantLinear):
    """LoRA on bitsandbytes `Linear8bitLt` (HF PEFT's `lora.Linear8bitLt`)."""


def layer_class(module) -> type[QuantLinear]:
    return Linear4bit if qbnb.bnb_kind(module) == "4bit" else Linear8bitLt


def build(base_layer, adapter_name, config, **kwargs) -> QuantLinear:
    """Dispatch target: the LoRA class for this bitsandbytes layer's kind."""
    return layer_class(base_layer)(base_layer, adapter_name, config, **kwargs)


# ---------------------------------------------------------------------------------------------- model level
def quant_layers(tuner) -> list[QuantLinear]:
    return [layer for layer in tuner.adapter_layers() if isinstance(layer, QuantLinear)]


def _take_back(layer, merged_before: int) -> None:
    if isinstance(layer, QuantLinear):
        layer.undo_last_merge()
        return
    while len(layer.merged_adapters) > merged_before:
        layer.unmerge_one(layer.merged_adapters.pop())


def merge_all_or_nothing(tuner, adapter_names: list[str] | None, safe_merge: bool) -> None:
    """`merge_adapter` over all layers where a refusal (e.g. `LossyMergeError`) in one layer takes back the merges
    this call already made in the others, so the model is left as it was."""
    tuner.check_mergeable()
    done = []
    try:
        for layer in tuner._top_layers():
            before = len(layer.merged_adapters)
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            if len(layer.merged_adapters) > before:
                done.append((layer, before))
    except Exception:
        for layer, before in reversed(done):
            _take_back(layer, before)
        raise


def merge_adapter(tuner, plain_merge, adapter_names, safe_merge, policy: dict) -> None:
    """`policy`: keywords of quant.bnb.merge_policy (bounds on the requantisation error)."""
    with qbnb.merge_policy(**policy):
        if not quant_layers(tuner):
            return plain_merge(adapter_names=adapter_names, safe_merge=safe_merge)
        merge_all_or_nothing(tuner, adapter_names, safe_merge)


def merge_and_unload(tuner, plain_unload, progressbar, safe_merge, adapter_names, policy: dict):
    """LoRA's merge_and_unload with quantised layers: all-or-nothing merges under the merge policy, or (with
    `policy["dequantize"]`) dense merged `nn.Linear` copies and every other bitsandbytes layer dequantised too."""
    dequantize = bool(policy.get("dequantize"))
    with qbnb.merge_policy(**policy):
        if quant_layers(tuner) and not dequantize:
            merge_all_or_nothing(tuner, adapter_names, safe_merge)
        model = plain_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
    if dequantize:
        dequantize_model(model)
    return model


def dequantize_model(model) -> None:
    """Replace every bitsandbytes linear layer of `model` by a dense `nn.Linear` and drop transformers'
    quantisation markers (so that save_pretrained writes an ordinary full-precision model)."""
    from ...core.tuner import set_submodule

    for name, module in list(model.named_modules()):
        if is_bnb_linear(module):
            set_submodule(model, name, qbnb.dense_linear(module, qbnb.dequantize_weight(module)))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
