"""Merging adapters into bitsandbytes Linear4bit / Linear8bitLt weights, one implementation for every method
whose layers run over them (each such method's methods/<m>/bnb.py: LoRA / DoRA, IA3, AdaLoRA, RandLoRA).

The forward pass is the method's own, run through the quantised base layer as HF PEFT does. What changes is
merging: a quantised weight cannot be edited in place, so `QuantisedMerge` dequantises it (quant/bnb.py),
applies the method's merge to the dense copy (`merged_dense`), requantises, measures the error this rounding
caused on a probe and lets the merge policy (quant/bnb.py: `merge_policy`, default at most 1 % relative output
error) refuse a lossy merge with `LossyMergeError` before anything changes. Unmerging puts the quantised
weight saved before the first merge back, bit for bit (no second rounding). Under
`merge_policy(dequantize=True)`, `merge_and_unload` replaces the layer by a dense `nn.Linear` holding the
merged weight instead of requantising.

HF PEFT 0.21 merges LoRA and RandLoRA into bitsandbytes weights silently and refuses to merge IA3 / AdaLoRA
into them.

Dispatch: `register_quantised(chain, four_bit, eight_bit)` puts a matcher first in a method's dispatch chain
that recognises bitsandbytes layers by their class's module, so bitsandbytes is never imported here.
`AllOrNothingMerge` (a tuner mixin) merges as one transaction (core/transaction.py): when one layer refuses,
the merges already made are taken back. It also gives the tuner the merge keywords (allow_lossy_merge,
max_merge_error, max_adapter_loss; dequantize for merge_and_unload); a tuner that includes it thereby declares
`requantises_merges`. Layer classes of other methods over bitsandbytes weights run their forward pass, but
`refuse_plain_merge` stops their merges (which would add to the packed 4-bit bytes or silently round the
update away in int8).

Generic machinery (core/layer.py calls `refuse_plain_merge`): it names no method; the methods import it.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..core.transaction import Transaction
from ..core.tuner import set_submodule
from ..errors import AdapterStateError
from ..registry import registered
from . import bnb as qbnb


def is_bnb_linear(module: nn.Module) -> bool:
    """bitsandbytes Linear4bit / Linear8bitLt (recognised without importing bitsandbytes)."""
    return qbnb.bnb_kind(module) is not None


def register_quantised(chain, four_bit: type, eight_bit: type) -> None:
    """Make `chain` wrap bitsandbytes 4-bit layers in `four_bit` and 8-bit ones in `eight_bit` (checked
    first)."""

    def build(base_layer, *args, **kwargs):
        layer_cls = four_bit if qbnb.bnb_kind(base_layer) == "4bit" else eight_bit
        return layer_cls(base_layer, *args, **kwargs)

    chain.register(is_bnb_linear, build, first=True)


def requantising_methods() -> list[str]:
    """The registered methods whose tuner declares `requantises_merges` (by including `AllOrNothingMerge`)."""
    return sorted(spec.peft_type.value for spec in registered().values()
                  if getattr(spec.tuner_cls, "requantises_merges", False))


def refuse_plain_merge(layer: nn.Module, names: list[str]) -> None:
    """Called by `AdapterLayer.merge` for a layer class that adds its update to `weight.data`: over
    bitsandbytes weights that would fail on the packed 4-bit tensor or silently corrupt the int8 one, so
    refuse first."""
    if not names:
        return
    base = layer.get_base_layer()
    method = type(layer).__module__.split(".")[-2]
    raise AdapterStateError(
        f"Cannot merge {method} adapter(s) {names} into the bitsandbytes {qbnb.bnb_kind(base)} weights of "
        f"{type(base).__name__}({base.in_features}, {base.out_features}): only the layers of "
        f"{', '.join(requantising_methods())} can requantise a merged weight. Keep the adapter unmerged, or "
        "load the base model unquantised (e.g. dtype=torch.bfloat16), load the adapter onto it and merge "
        "there."
    )


class QuantisedMerge:
    """Mixin placed before a method's Linear class (LoRA's too: lora/bnb.py); the method supplies
    `merged_dense`. `last_merge_error`: the `QuantError` of the latest merge into this layer (None before
    one)."""

    method_label = "adapter"
    last_merge_error: qbnb.QuantError | None = None

    def merged_dense(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        """(weight, bias) after merging adapter `name` into dense float32 `weight` (out, in) and `bias`."""
        raise NotImplementedError

    @property
    def _snapshots(self) -> list:
        return self.__dict__.setdefault("_quant_snapshots", [])

    def _pending(self, adapter_names) -> list[str]:
        names = self._active_adapters if adapter_names is None else adapter_names
        own = self.adapter_names()
        return [n for n in names if n in own and n not in self.merged_adapters]

    def _merge_plan(self, names: list[str], safe_merge: bool):
        """(dense weight before, dense weight after, bias after) for merging `names`, nothing changed yet."""
        base = self.get_base_layer()
        start = qbnb.dequantize_weight(base).float()
        weight, bias = start, None if base.bias is None else base.bias.data
        for name in names:
            weight, bias = self.merged_dense(name, weight, bias)
        if safe_merge and not all(torch.isfinite(t).all() for t in (weight, bias) if t is not None):
            raise ValueError(f"NaNs or infs in the merged weights: {self.method_label} adapter(s) {names} "
                             "seem to be broken.")
        return start, weight, bias

    def _where(self, names: list[str]) -> str:
        base = self.get_base_layer()
        target = getattr(self, "target_name", "")
        layer = f"layer '{target}'" if target else \
            f"{type(base).__name__}({base.in_features}, {base.out_features})"
        return f"{self.method_label} {layer} (adapters {names})"

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = self._pending(adapter_names)
        if not names:
            return
        base = self.get_base_layer()
        start, weight, bias = self._merge_plan(names, safe_merge)
        param = qbnb.quantized_param(base, weight)
        error = qbnb.measure_error(weight, qbnb.dequantize_param(base, param), weight - start)
        qbnb.enforce(error, self._where(names))
        self._snapshots.append((len(self.merged_adapters), qbnb.snapshot(base)))
        qbnb.install_weight(base, param)
        if bias is not None:
            base.bias.data = bias.to(base.bias.dtype)
        self.merged_adapters.extend(names)
        self.last_merge_error = error

    def undo_last_merge(self) -> None:
        """Take back the latest `merge` call (the weight it replaced goes back, exactly)."""
        count, saved = self._snapshots.pop()
        qbnb.restore(self.get_base_layer(), saved)
        del self.merged_adapters[count:]

    def unmerge(self) -> None:
        """Restore the quantised weight (and bias) from before the first merge, exactly."""
        if self._snapshots:
            qbnb.restore(self.get_base_layer(), self._snapshots[0][1])
        self._snapshots.clear()
        self.merged_adapters.clear()

    def unloaded(self, merge: bool, safe_merge: bool = False,
                 adapter_names: list[str] | None = None) -> nn.Module:
        if not (merge and qbnb.current_policy().dequantize):
            return super().unloaded(merge, safe_merge=safe_merge, adapter_names=adapter_names)
        base = self.get_base_layer()
        _, weight, bias = self._merge_plan(self._pending(adapter_names), safe_merge)
        dense = qbnb.dense_linear(base, weight)
        if bias is not None:
            dense.bias.data = bias.to(dense.weight.dtype)
        return dense


class AdditiveQuantisedMerge(QuantisedMerge):
    """For methods whose update is added to the weight (`delta_weight`, (out, in) for a bitsandbytes
    layer)."""

    def merged_dense(self, name, weight, bias):
        return weight + self.delta_weight(name).to(weight.device, torch.float32), bias


# ---------------------------------------------------------------------------------------------- model level
class AllOrNothingMerge:
    """Tuner mixin: with layers over bitsandbytes weights, `merge_adapter` / `merge_and_unload` either merge
    every layer or, when one refuses (e.g. `LossyMergeError`), take back the merges already made and leave the
    model as it was. The keywords set the merge policy for the call (left out, an enclosing
    `quant.bnb.merge_policy(...)` block still applies). Without such layers nothing changes."""

    # read by `requantising_methods`: this tuner's methods have layers that requantise merged weights
    requantises_merges = True

    def _quantised_layers(self) -> bool:
        return any(isinstance(layer, QuantisedMerge) for layer in self.adapter_layers())

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False, *,
                      allow_lossy_merge: bool = False, max_merge_error: float | None = None,
                      max_adapter_loss: float | None = None) -> None:
        """Merge the adapters. On 4-bit / 8-bit layers, a merge whose requantisation changes the outputs by
        more than `max_merge_error` (relative; default quant.bnb.DEFAULT_MAX_MERGE_ERROR) or loses more than
        `max_adapter_loss` of the adapter's own contribution raises LossyMergeError (nothing is merged then)
        unless `allow_lossy_merge`."""
        if not self._quantised_layers():
            return super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
        self.check_mergeable()
        with qbnb.merge_policy(max_merge_error, allow_lossy_merge or None, max_adapter_loss=max_adapter_loss):
            _merge_all_or_nothing(self.model, self._top_layers(), adapter_names, safe_merge)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None, *, allow_lossy_merge: bool = False,
                         max_merge_error: float | None = None, max_adapter_loss: float | None = None,
                         dequantize: bool = False) -> nn.Module:
        """As HF PEFT; `dequantize=True`: merged layers become dense nn.Linear copies, and every other
        bitsandbytes layer of the result is dequantised too (an ordinary full-precision model)."""
        with qbnb.merge_policy(max_merge_error, allow_lossy_merge or None, dequantize or None,
                               max_adapter_loss):
            model = super().merge_and_unload(progressbar, safe_merge, adapter_names)
            if qbnb.current_policy().dequantize:
                dequantize_model(model)
        return model

    def _unload(self, merge: bool, progressbar: bool = False, safe_merge: bool = False,
                adapter_names: list[str] | None = None) -> nn.Module:
        if merge and self._quantised_layers() and not qbnb.current_policy().dequantize:
            # refusals before any unloading
            self.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
        return super()._unload(merge, progressbar=progressbar, safe_merge=safe_merge,
                               adapter_names=adapter_names)


def _merge_all_or_nothing(model: nn.Module, layers, adapter_names, safe_merge: bool) -> None:
    """One transaction (core/transaction.py) whose undo steps take back each layer's merge: a quantised weight
    gets its snapshot back (the object: no copy, bit-exact), a plain layer unmerges what it merged."""
    with Transaction(model) as tx:
        for layer in layers:
            # declared before the call, so a layer failing half-way (a plain layer on its 2nd adapter) is
            # taken back
            tx.on_failure(functools.partial(_take_back, layer, len(layer.merged_adapters)))
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)


def _take_back(layer, merged_before: int) -> None:
    if len(layer.merged_adapters) <= merged_before:
        return
    if isinstance(layer, QuantisedMerge):
        layer.undo_last_merge()
        return
    while len(layer.merged_adapters) > merged_before:
        layer.unmerge_one(layer.merged_adapters.pop())


def dequantize_model(model: nn.Module) -> None:
    """Replace every bitsandbytes linear layer of `model` by a dense `nn.Linear` and drop transformers'
    quantisation markers (so that save_pretrained writes an ordinary full-precision model)."""
    for name, module in list(model.named_modules()):
        if is_bnb_linear(module):
            set_submodule(model, name, qbnb.dense_linear(module, qbnb.dequantize_weight(module)))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
