"""`AdapterLayer`: the wrapper every layer-based method subclasses.

The control flow (forward with disabled / merged / mixed-batch paths, merge, unmerge, activation, delete) is
written once here. A method supplies `update_layer`, `adapter_output` and `delta_weight`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..quant.bnb import bnb_kind
from .device_index import index_tensor

if TYPE_CHECKING:
    from ..config import PeftConfig

logger = logging.getLogger(__name__)


@contextmanager
def eval_mode(module: nn.Module):
    """`module` and its children in eval mode inside the block, each flag restored after: a merge adds only
    the deterministic update, never one drawn with the dropout / random masks / sampling that training mode
    turns on."""
    flags = [(m, m.training) for m in module.modules() if m.training]
    for m, _ in flags:
        m.training = False
    try:
        yield
    finally:
        for m, mode in flags:
            m.training = mode


class CallState:
    """Values of the running forward / generate call, one object per tuner, shared by all its holders.

    The tuner writes it once per call (O(1) whatever the number of layers); holders read it in forward:
    `names` (per-row adapter names of a mixed batch, or None), `encoder_names` (those of an encoder-decoder's
    encoder, one per input row when generate repeats rows for beams) and `values` (`Tuner.call_context`).
    """

    def __init__(self) -> None:
        self.names: list[str] | None = None
        self.encoder_names: list[str] | None = None
        self.values: dict = {}


def _named_parameters(module: nn.Module):
    """`module.named_parameters()`; for a module without children (LoRA's A / B) read straight from its own
    dict, skipping torch's generic walk (same names, order and de-duplication)."""
    if module._modules:
        return module.named_parameters()
    seen: set[int] = set()
    found = []
    for pname, param in module._parameters.items():
        if param is not None and id(param) not in seen:
            seen.add(id(param))
            found.append((pname, param))
    return found


def set_adapter_arguments(names: str | list[str], trainable: Iterable[str] | None,
                          inference_mode: bool) -> tuple[list[str], set[str]]:
    """(names as a list, names that train) from either call form of `set_adapter` (see AdapterLayer)."""
    names = [names] if isinstance(names, str) else list(names)
    if trainable is None:
        trainable = () if inference_mode else names
    return names, set(trainable)


class AdapterHolder:
    """Protocol of modules that hold per-adapter state (adapter layers and modules_to_save wrappers)."""

    _call_state: CallState | None = None  # set by the tuner (`bind_call_state`)
    _in_encoder: bool = False
    # file keys drop the adapter-name component of a parameter's path; a holder whose file format keeps
    # a fixed name in that place instead (HF PEFT writes `.default.` whatever the adapter's name) says which
    file_adapter_label: str | None = None
    # per-adapter containers whose entry is one module with one `weight`, stored in files under the
    # container's own name (HF PEFT's format, e.g. `...lora_magnitude_vector` for `...<adapter>.weight`)
    file_bare_entries: tuple[str, ...] = ()

    def bind_call_state(self, state: CallState, in_encoder: bool) -> None:
        self.__dict__["_call_state"] = state  # plain attributes: no nn.Module bookkeeping
        self.__dict__["_in_encoder"] = in_encoder

    @property
    def forward_context(self) -> dict | None:
        """The tuner's per-call values (`Tuner.call_context`), None outside a tuner's call."""
        state = self._call_state
        return None if state is None else state.values

    def call_adapter_names(self, kwargs: dict) -> list[str] | None:
        """Per-row adapter names for this call: `adapter_names=` if passed (popped from `kwargs`), else those
        of the tuner's running mixed-batch call; None for a normal call. Nested layers (run by their owner)
        get none."""
        names = kwargs.pop("adapter_names", None)
        state = self._call_state
        if names is not None or state is None or state.names is None or getattr(self, "nested", False):
            return names
        return state.encoder_names if self._in_encoder and state.encoder_names is not None else state.names

    def set_adapter(self, names: str | list[str], trainable: Iterable[str] | None = None,
                    inference_mode: bool = False) -> None:  # pragma: no cover
        raise NotImplementedError

    def delete_adapter(self, name: str) -> None:  # pragma: no cover
        raise NotImplementedError

    def enable_adapters(self, enabled: bool) -> None:  # pragma: no cover
        raise NotImplementedError

    def adapter_names(self) -> set[str]:  # pragma: no cover
        raise NotImplementedError

    def adapter_parameters(self, name: str):  # pragma: no cover
        """(key relative to the holder, parameter) for each trainable tensor of adapter `name`."""
        raise NotImplementedError

    def adapter_tensors(self, name: str):
        """(relative key, tensor) for everything of adapter `name` stored in adapter files."""
        return self.adapter_parameters(name)

    def frozen_parameters(self, name: str):
        """Parameters of adapter `name` that are saved but never trained (e.g. MiCA's fixed B)."""
        return ()

    def unloaded(self, merge: bool) -> nn.Module:  # pragma: no cover
        """The plain module that replaces this holder in `unload` / `merge_and_unload`."""
        raise NotImplementedError


class AdapterLayer(nn.Module, AdapterHolder):
    """Wraps `base_layer` and adds per-adapter parameters kept in the dicts named by `adapter_param_names`."""

    # attributes (nn.ModuleDict / nn.ParameterDict keyed by adapter name) holding trainable adapter tensors
    adapter_param_names: tuple[str, ...] = ()
    # set on layers owned by another adapter layer (e.g. MHA's out_proj): the owner merges / unloads them
    nested: bool = False
    # the wrapped module's parameter this layer adapts, for layers on a bare parameter (else the whole module)
    parameter_name: str | None = None
    # adapters add to the base output (adapter_output / delta_weight); False: the layer overrides
    # adapted_forward
    additive: bool = True
    # HF PEFT's switch (peft.helpers.disable_input_dtype_casting sets it per layer): False leaves the input in
    # its dtype instead of casting it to the adapter's. Only layers whose casts all go through `cast_input`
    # honour it; they set `input_cast_switchable`, and the context manager refuses the others
    # (core/input_casting.py).
    cast_input_dtype_enabled: bool = True
    input_cast_switchable: bool = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._disable_adapters = False

    # ------------------------------------------------------------------ to implement per method
    def update_layer(self, adapter_name: str, config: PeftConfig, **kwargs) -> None:
        raise NotImplementedError

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The adapter's additive contribution to the base output for input `x`."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """The change to `base_layer.weight` equivalent to the adapter (same shape and layout)."""
        raise NotImplementedError

    def delta_bias(self, name: str) -> torch.Tensor | None:
        return None

    def leaves_shared_weight(self, name: str) -> bool:
        """True where merging adapter `name` leaves the base weight alone because the layer it shares that
        weight with merges the same update (LoRA's tied LM head under ensure_weight_tying marks itself in
        `weight_followed`): such a pair is kept tied on merge (core/tying.py)."""
        return bool(self.__dict__.get("weight_followed", {}).get(name))

    # ------------------------------------------------------------------ state
    def get_base_layer(self) -> nn.Module:
        """The innermost wrapped module: as HF PEFT, through adapter layers of other methods that this one
        wraps (a mixed model nests them)."""
        base = self.base_layer
        return base.get_base_layer() if isinstance(base, AdapterLayer) else base

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapters[0] if len(self._active_adapters) == 1 else list(self._active_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def adapter_names(self) -> set[str]:
        names: set[str] = set()
        for attr in self.adapter_param_names:
            names.update(getattr(self, attr).keys())
        return names

    def has_adapter(self, name: str) -> bool:
        """`name in self.adapter_names()`, without building the set."""
        for attr in self.adapter_param_names:
            if name in getattr(self, attr):
                return True
        return False

    def adapter_parameters(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(key relative to this layer as in its state dict, parameter) for adapter `name`."""
        for attr in self.adapter_param_names:
            holder = getattr(self, attr)
            if name not in holder:
                continue
            item = holder[name]
            if isinstance(item, nn.Module):  # tested first: nn.Parameter's isinstance check runs in Python
                for pname, param in _named_parameters(item):
                    yield f"{attr}.{name}.{pname}", param
            else:
                yield f"{attr}.{name}", item

    def set_adapter(self, names: str | list[str], trainable: Iterable[str] | None = None,
                    inference_mode: bool = False) -> None:
        """Activate `names` (those this layer has); adapters in `trainable` get requires_grad, others not.
        Called as HF PEFT's `BaseTunerLayer.set_adapter(names, inference_mode=False)` (transformers and
        diffusers do), without `trainable`: the active adapters train unless `inference_mode`."""
        names, trainable = set_adapter_arguments(names, trainable, inference_mode)
        # kept as asked (as HF PEFT, for status reports); forward and merge skip names this layer lacks
        self._active_adapters = list(names)
        train = trainable.intersection(names)
        # a load visits every adapter of every layer: flags are written only where they change, frozen
        # parameters (saved, never trained) last
        for name, param in self._adapter_parameter_tensors():
            want = name in train
            if param.requires_grad != want:
                param.requires_grad_(want)
        for name in self.adapter_names():
            for param in self.frozen_parameters(name):
                if param.requires_grad:
                    param.requires_grad_(False)

    def _adapter_parameter_tensors(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(adapter name, parameter) over `adapter_parameters` of every adapter, without building keys: one
        pass over each per-adapter dict (a subclass overriding `adapter_parameters` is read through it)."""
        if type(self).adapter_parameters is not AdapterLayer.adapter_parameters:
            for name in self.adapter_names():
                yield from ((name, param) for _, param in self.adapter_parameters(name))
            return
        for attr in self.adapter_param_names:
            for name, item in getattr(self, attr).items():
                if isinstance(item, nn.Module):
                    for _, param in _named_parameters(item):
                        yield name, param
                else:
                    yield name, item

    def enable_adapters(self, enabled: bool) -> None:
        """Disabled adapters are skipped in forward and stop training (the tuner re-applies grads on
        enable)."""
        self._disable_adapters = not enabled
        if not enabled:
            for name in self.adapter_names():
                for _, param in self.adapter_parameters(name):
                    param.requires_grad_(False)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(
                f"Adapter '{name}' is merged into the base weights; call unmerge_adapter() first.")
        for key, value in vars(self).items():  # per-adapter settings such as r / scaling
            if not key.startswith("_") and isinstance(value, dict) and name in value:
                del value[name]
        for module in self._modules.values():
            if isinstance(module, (nn.ModuleDict, nn.ParameterDict)) and name in module:
                del module[name]
        self._active_adapters = [n for n in self._active_adapters if n != name]

    def release(self) -> nn.Module:
        """Undo any change this wrapper made to its base layer at construction; return the base layer."""
        return self.base_layer

    # ------------------------------------------------------------------ forward
    def base_forward(self, *args, **kwargs):
        return self.base_layer(*args, **kwargs)

    def forward(self, x, *args, **kwargs):
        adapter_names = self.call_adapter_names(kwargs)
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_forward(x, *args, **kwargs)
        if adapter_names is not None:
            return self.mixed_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return self.base_forward(x, *args, **kwargs)
        return self.adapted_forward(x, self._active_adapters, *args, **kwargs)

    def adapted_forward(self, x, names: list[str], *args, **kwargs):
        """The output with the unmerged adapters `names` applied: additive by default. Layers of methods that
        rescale or transform the input / output / weight (IA3, OFT, ...) override this together with
        `merge_one` / `unmerge_one`, and set `additive = False` so mixed batches run each group through it."""
        result = self.base_forward(x, *args, **kwargs)
        return self.add_adapters(result, x, names, *args, **kwargs)

    def add_adapters(self, result: torch.Tensor, x: torch.Tensor, names: Iterable[str], *args, **kwargs):
        out_dtype = result.dtype
        own = self.adapter_names()
        for name in names:
            if name in own:
                result = result + self.adapter_output(name, x, *args, **kwargs)
        return result.to(out_dtype)

    def check_mixed_batch(self, x, adapter_names: list[str]) -> None:
        if self.merged:
            raise ValueError("Mixed-adapter batches need unmerged adapters; call unmerge_adapter() first.")
        if len(adapter_names) != x.shape[0]:
            raise ValueError(
                f"adapter_names has {len(adapter_names)} entries but the batch has {x.shape[0]}.")

    def mixed_forward(self, x, *args, adapter_names: list[str], **kwargs):
        """Each sample uses its own adapter (`adapter_names[i]`); "__base__" means no adapter."""
        self.check_mixed_batch(x, adapter_names)
        if not self.additive:
            return self._grouped_forward(x, adapter_names, *args, **kwargs)
        result = self.base_forward(x, *args, **kwargs)
        out_dtype = result.dtype
        own = self.adapter_names()
        for name in sorted(set(adapter_names) & own):
            idx = index_tensor([i for i, n in enumerate(adapter_names) if n == name], x.device)
            sub = self.adapter_output(name, x.index_select(0, idx), *args, **kwargs)
            result = result.index_add(0, idx.to(result.device), sub.to(result.dtype))
        return result.to(out_dtype)

    def _grouped_forward(self, x, adapter_names: list[str], *args, **kwargs):
        """Mixed batch for non-additive layers: the rows of each adapter through `adapted_forward`
        together."""
        result = self.base_forward(x, *args, **kwargs)
        own = self.adapter_names()
        for name in sorted(set(adapter_names) & own):
            idx = index_tensor([i for i, n in enumerate(adapter_names) if n == name], x.device)
            rows = self.adapted_forward(x.index_select(0, idx), [name], *args, **kwargs)
            idx = idx.to(result.device)
            result = result.index_copy(0, idx, rows.to(result.dtype))
        return result

    def cast_input(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`x` in the adapter's `dtype`, unless input casting is switched off for this layer."""
        if x.dtype == dtype or not self.cast_input_dtype_enabled:
            return x
        return x.to(dtype)

    # ---------------------------------------------------------------- per-adapter scale (HF PEFT's layer API)
    # diffusers' set_adapters weights, lora_scale and fuse_lora(lora_scale=) call these on every adapter
    # layer. A method whose output is scaled by `self.scaling[name]` supplies `initial_scaling`; others
    # refuse.
    def initial_scaling(self, name: str) -> float:
        """The scale adapter `name` got at creation (from its config), which `set_scale` multiplies."""
        raise NotImplementedError(
            f"{type(self).__module__}.{type(self).__name__} layers have no per-adapter scale: set_scale / "
            "scale_layer / unscale_layer (what diffusers' set_adapters weights and its fusing / call scales "
            "use) are not served for this method."
        )

    def set_scale(self, adapter: str, scale: float) -> None:
        """Adapter `adapter`'s scale = `scale` times its initial scale (adapters this layer lacks:
        ignored)."""
        if self.has_adapter(adapter):
            self._write_scaling(adapter, scale * self.initial_scaling(adapter))

    def scale_layer(self, scale: float) -> None:
        """Multiply the scale of every active adapter of this layer by `scale`."""
        if scale == 1:
            return
        for name in self._scaled_active_adapters():
            self._write_scaling(name, self.scaling[name] * scale)

    def unscale_layer(self, scale: float | None = None) -> None:
        """Divide the active adapters' scales by `scale`; `None`: back to their initial scales."""
        for name in self._scaled_active_adapters():
            value = self.initial_scaling(name) if scale is None else self.scaling[name] / scale
            self._write_scaling(name, value)

    def _scaled_active_adapters(self) -> list[str]:
        names = [n for n in self._active_adapters if self.has_adapter(n)]
        if names:
            self.initial_scaling(names[0])  # refuses on layers without a scale
        return names

    def _write_scaling(self, name: str, value) -> None:
        current = self.scaling.get(name)
        # held as a tensor for compiled hot-swaps: same tensor, new value
        if isinstance(current, torch.Tensor):
            current.fill_(value)
        else:
            self.scaling[name] = float(value)

    # ------------------------------------------------------------------ merging
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = self._active_adapters if adapter_names is None else adapter_names
        own = self.adapter_names()
        if bnb_kind(self.get_base_layer()) is not None:  # this layer class cannot requantise (quant/merge.py)
            # imported here: quant/merge.py imports the tuner, which imports this module
            from ..quant.merge import refuse_plain_merge
            refuse_plain_merge(self, [n for n in names if n in own and n not in self.merged_adapters])
        for name in names:
            if name not in own:
                continue
            if name in self.merged_adapters:
                logger.info("Adapter '%s' is already merged; skipping.", name)
                continue
            with eval_mode(self):  # training mode must not change what is merged (e.g. dropout)
                self.merge_one(name, safe_merge)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            with eval_mode(self):
                self.unmerge_one(self.merged_adapters.pop())

    def merge_one(self, name: str, safe_merge: bool) -> None:
        base = self.get_base_layer()
        updates = [(base.weight, self.delta_weight(name))]
        delta_b = self.delta_bias(name)
        if delta_b is not None:
            updates.append((base.bias, delta_b))
        new_values = [(p, p.data + d.to(p.dtype)) for p, d in updates]
        if safe_merge:
            for _, value in new_values:
                if not torch.isfinite(value).all():
                    raise ValueError(
                        f"NaNs or infs in the merged weights: adapter '{name}' seems to be broken.")
        for param, value in new_values:
            param.data = value

    def unmerge_one(self, name: str) -> None:
        base = self.get_base_layer()
        base.weight.data -= self.delta_weight(name).to(base.weight.dtype)
        delta_b = self.delta_bias(name)
        if delta_b is not None:
            base.bias.data -= delta_b.to(base.bias.dtype)

    def unloaded(self, merge: bool, safe_merge: bool = False,
                 adapter_names: list[str] | None = None) -> nn.Module:
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        return self.release()

    def __repr__(self) -> str:
        return f"{type(self).__module__.split('.')[-2]}.{super().__repr__()}"
