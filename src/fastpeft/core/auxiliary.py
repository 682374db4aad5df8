"""Auxiliary trainable modules: `ModulesToSaveWrapper` keeps a trainable copy of a whole module per
adapter."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from copy import deepcopy

import torch
from torch import nn

from .device_index import index_tensor
from .layer import AdapterHolder, set_adapter_arguments


class AuxiliaryTrainingWrapper(nn.Module, AdapterHolder):
    """A module wrapped to train something beside the adapter layers (HF PEFT's class of the same name:
    transformers finds these with isinstance when it loads adapter files itself)."""

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict[str, str]:
        """{key in an adapter file: key of the tensor it fills}, both relative to this module."""
        raise NotImplementedError


class ModulesToSaveWrapper(AuxiliaryTrainingWrapper):
    """Holds `original_module` (frozen) and one trainable deep copy per adapter in `modules_to_save`."""

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict[str, str]:
        # files store the copy at the module's own path (checkpoint/keys.py)
        if adapter_name not in self.modules_to_save:
            return {}
        return {key: f"modules_to_save.{adapter_name}.{key}"
                for key in self.modules_to_save[adapter_name].state_dict()}

    def __init__(self, module_to_save: nn.Module, adapter_name: str, copy: nn.Module | None = None) -> None:
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict()
        self._active_adapters: list[str] = []
        self._disable_adapters = False
        self.update(adapter_name, copy=copy)

    def update(self, adapter_name: str, copy: nn.Module | None = None) -> None:
        """Add `adapter_name`'s trainable copy: a deep copy of the original, or `copy` (e.g. one sharing
        weights)."""
        if adapter_name in self.modules_to_save:
            return
        copied = deepcopy(self.original_module) if copy is None else copy
        self.modules_to_save[adapter_name] = copied
        for param in self.original_module.parameters():
            param.requires_grad_(False)

    @property
    def active_adapter(self) -> str | None:
        return self._active_adapters[0] if self._active_adapters else None

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save", "_active_adapters", "_disable_adapters"):
                raise
            return getattr(self._current(), name)  # e.g. .weight, .bias, .out_features of the wrapped module

    def _current(self, adapter: str | None = None) -> nn.Module:
        adapter = self.active_adapter if adapter is None else adapter
        if self._disable_adapters or adapter is None or adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[adapter]

    def forward(self, *args, **kwargs):
        adapter_names = self.call_adapter_names(kwargs)  # explicit, or the tuner's running mixed batch
        if adapter_names is None or self._disable_adapters:
            return self._current()(*args, **kwargs)
        return self._mixed_forward(adapter_names, *args, **kwargs)

    def _mixed_forward(self, adapter_names: list[str], x, *args, **kwargs):
        """Each sample through its own adapter's copy ("__base__" and adapters without one: the original)."""
        out = None
        for name in sorted(set(adapter_names)):
            idx = index_tensor([i for i, n in enumerate(adapter_names) if n == name], x.device)
            sub = self._current(name)(x[idx], *args, **kwargs)
            if out is None:
                out = sub.new_empty((len(adapter_names), *sub.shape[1:]))
            out[idx] = sub
        return out

    def adapter_names(self) -> set[str]:
        return set(self.modules_to_save.keys())

    def adapter_parameters(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        if name in self.modules_to_save:
            for pname, param in self.modules_to_save[name].named_parameters():
                yield f"modules_to_save.{name}.{pname}", param

    def adapter_tensors(self, name: str) -> Iterator[tuple[str, torch.Tensor]]:
        if name in self.modules_to_save:  # the whole state: buffers such as BatchNorm statistics too
            for key, tensor in self.modules_to_save[name].state_dict(keep_vars=True).items():
                yield f"modules_to_save.{name}.{key}", tensor

    def set_adapter(self, names: str | list[str], trainable: Iterable[str] | None = None,
                    inference_mode: bool = False) -> None:
        names, trainable = set_adapter_arguments(names, trainable, inference_mode)
        present = [n for n in names if n in self.modules_to_save]
        if len(present) > 1:
            raise ValueError(
                f"Adapters {present} each have their own copy of a modules_to_save module; "
                "only one can be active."
            )
        self._active_adapters = present
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name in present and name in trainable)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled
        if not enabled:
            self.modules_to_save.requires_grad_(False)

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self._active_adapters = [n for n in self._active_adapters if n != name]

    def unloaded(self, merge: bool, safe_merge: bool = False,
                 adapter_names: list[str] | None = None) -> nn.Module:
        # as HF PEFT: the active trained copy replaces the module (the trained head is part of the result)
        return self._current() if not self._disable_adapters else self.original_module


def wrap_modules_to_save(model: nn.Module, adapter_name: str, wanted) -> None:
    """Wrap each module named (as a suffix) in `wanted` with a ModulesToSaveWrapper for `adapter_name`."""
    from .layer import AdapterHolder, AdapterLayer
    from .targeting import candidate_modules

    if not wanted:
        return
    for name, module in candidate_modules(model, (AdapterHolder,)):
        if not any(name.endswith(w) for w in wanted):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            module.update(adapter_name)
        elif isinstance(module, AdapterLayer):
            raise ValueError(
                f"Module '{name}' matches both target_modules and modules_to_save; pick one of the two.")
        else:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child,
                    ModulesToSaveWrapper(module, adapter_name))
