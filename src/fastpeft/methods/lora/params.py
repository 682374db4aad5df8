"""LoRA on bare `nn.Parameter`s (`LoraConfig.target_parameters`), e.g. MoE expert stacks stored as tensors.

2-D weight W (out, in): A (r, in), B (out, r), dW = s * B @ A. 3-D experts W (E, out, in), or (E, in, out)
when the owner sets `is_transposed`: A (r*E, in), B (out, r*E); expert e uses A rows [e*r, (e+1)*r) and B
columns e, e+E, ... The wrapper replaces the module owning W; in forward W reads as W + dW. Two targets on one
module nest wrappers.
"""

from __future__ import annotations

import difflib
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ...core import targeting
from ...core.layer import AdapterHolder, AdapterLayer
from ...integrations.transformers_defaults import model_type_of
from .layer import LoraLayer

SUPPORTED_INITS = (True, False, "gaussian")  # schemes that need no decomposition of a 2-D base weight


def _check_config(config) -> None:
    refused = {
        "lora_dropout != 0 (dropout cannot act on a weight)": config.lora_dropout,
        "fan_in_fan_out=True": config.fan_in_fan_out,
        "lora_bias=True": config.lora_bias,
        "use_dora=True": config.use_dora,
    }
    bad = [label for label, value in refused.items() if value]
    if config.init_lora_weights not in SUPPORTED_INITS:
        bad.append(f"init_lora_weights={config.init_lora_weights!r} (supported: {list(SUPPORTED_INITS)})")
    if bad:
        raise ValueError(
            f"LoRA on target_parameters does not support {', '.join(bad)}; change these options.")


class _AddDelta(nn.Module):
    """Parametrization W -> W + delta (delta built from the LoRA factors before the forward)."""

    def __init__(self, delta: torch.Tensor) -> None:
        super().__init__()
        self.delta = delta

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta.to(weight.dtype)


class ParamLora(LoraLayer):
    """Wraps the module owning parameter `parameter_name` (or another `ParamLora` on that module)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int, lora_alpha: float,
                 parameter_name: str, **kwargs) -> None:
        self.parameter_name = parameter_name
        self.owns_inner = False  # True when the wrapped ParamLora was built together with this one
        super().__init__(base_layer, adapter_name, config, r, lora_alpha)

    # ------------------------------------------------------------------ shapes
    def owner(self) -> nn.Module:
        module = self.base_layer
        while isinstance(module, ParamLora):
            module = module.base_layer
        return module

    def get_base_layer(self) -> nn.Module:
        return self.owner()

    def param(self) -> torch.Tensor:
        return getattr(self.owner(), self.parameter_name)

    @property
    def weight(self) -> torch.Tensor:
        return self.param()

    @property
    def transposed(self) -> bool:
        return self.param().dim() == 3 and bool(getattr(self.owner(), "is_transposed", False))

    def feature_sizes(self, base):
        shape = self.param().shape
        if len(shape) == 2:  # (out, in)
            self.num_experts = 1
            return shape[1], shape[0]
        if len(shape) == 3:  # (E, out, in), or (E, in, out) if transposed
            self.num_experts = shape[0]
            return (shape[1], shape[2]) if self.transposed else (shape[2], shape[1])
        raise ValueError(
            f"target_parameters: '{self.parameter_name}' of {type(self.owner()).__name__} has shape "
            f"{tuple(shape)}; only 2-D (out, in) weights and 3-D (experts, out, in) expert "
            "stacks are supported."
        )

    def build(self, name, r, lora_bias):
        self.lora_A[name] = nn.Linear(self.in_features, r * self.num_experts, bias=False)
        self.lora_B[name] = nn.Linear(r * self.num_experts, self.out_features, bias=False)

    def update_layer(self, adapter_name, config, r, lora_alpha, **kwargs):
        _check_config(config)
        super().update_layer(adapter_name, config, r=r, lora_alpha=lora_alpha)

    def delta_weight(self, name: str) -> torch.Tensor:
        param = self.param()
        if param.dim() == 2:
            return self._product(name).to(param.dtype)
        a, b = self.lora_weights(name)
        if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
            a, b = a.float(), b.float()
        a3 = a.reshape(self.num_experts, -1, a.shape[-1])  # (E, r, in)
        b3 = b.reshape(b.shape[0], -1, self.num_experts)  # (out, r, E)
        layout = "ore,eri->eio" if self.transposed else "ore,eri->eoi"
        return (torch.einsum(layout, b3, a3) * self.scaling[name]).to(param.dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, x, *args, **kwargs):
        if self.call_adapter_names(kwargs) is not None:
            raise ValueError(
                "LoRA on target_parameters does not support mixed-adapter batches (adapter_names).")
        if self._disable_adapters and self.merged:
            self.unmerge()
        own = self.adapter_names()
        active = ([] if self._disable_adapters or self.merged
                  else [n for n in self._active_adapters if n in own])
        if not active:
            return self.base_layer(x, *args, **kwargs)
        with self._delta_applied(active):
            return self.base_layer(x, *args, **kwargs)

    @contextmanager
    def _delta_applied(self, names: list[str]):
        owner, pname = self.owner(), self.parameter_name
        delta = sum(self.delta_weight(n) for n in names)
        grad = self.param().requires_grad
        parametrize.register_parametrization(owner, pname, _AddDelta(delta))
        owner.parametrizations[pname].original.requires_grad_(grad)
        try:
            with parametrize.cached():
                yield
        finally:
            _remove_last(owner, pname)

    # ------------------------------------------------------------------ merging / unloading
    def merge_one(self, name, safe_merge):
        param = self.param()
        merged = param.data + self.delta_weight(name).to(param.dtype)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs or infs in the merged weights: adapter '{name}' seems to be broken.")
        param.data = merged

    def unmerge_one(self, name):
        param = self.param()
        param.data -= self.delta_weight(name).to(param.dtype)

    def release(self) -> nn.Module:
        base = self.base_layer
        if self.owns_inner and isinstance(base, ParamLora):
            return base.release()
        return base

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}"


def _remove_last(owner: nn.Module, pname: str) -> None:
    """Drop the `_AddDelta` registered last on `owner.pname` (keeping parametrizations registered by
    others)."""
    chain = owner.parametrizations[pname]
    if len(chain) == 1:
        parametrize.remove_parametrizations(owner, pname, leave_parametrized=False)
        return
    for i in reversed(range(len(chain))):
        if isinstance(chain[i], _AddDelta):
            del chain[i]
            return


# ---------------------------------------------------------------------------------------------- targeting
@dataclass
class ParamTarget:
    """Parameters of one module that get new wrappers: `params` = [(parameter name, full key)], innermost
    first."""

    module: nn.Module
    params: list[tuple[str, str]] = field(default_factory=list)


def build_wrappers(target: ParamTarget, adapter_name: str, config, **_module_kwargs) -> ParamLora:
    """Nest one ParamLora per parameter around `target.module`; rank / alpha come from each parameter's
    key."""
    layer = target.module
    for pname, key in target.params:
        r = targeting.pattern_value(config.rank_pattern, key, config.r)
        alpha = targeting.pattern_value(config.alpha_pattern, key, config.lora_alpha)
        inner = layer
        layer = ParamLora(inner, adapter_name, config, r, alpha, parameter_name=pname)
        layer.owns_inner = inner is not target.module
    return layer


def _strip_base(name: str) -> str:
    return re.sub(r"(\.base_layer)+(?=\.|$)", "", name)


def _internal_ids(model: nn.Module) -> set[int]:
    """ids of modules inside adapter holders other than their base layer (adapter weights, saved copies)."""
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, AdapterHolder):
            for child_name, child in module.named_children():
                if child_name != "base_layer":
                    ids.update(id(m) for m in child.modules())
    return ids


def _matches(key: str, wanted: set[str]) -> bool:
    return key in wanted or any(key.endswith("." + w) for w in wanted)


def matched_parameters(model: nn.Module, config) -> list[tuple[str, str, str]]:
    """(owner module name in the model, parameter name, key without '.base_layer') for every targeted
    parameter."""
    if isinstance(config.target_parameters, str):
        raise TypeError(
            "target_parameters must be a list of parameter names (or dotted suffixes), not a str.")
    wanted, internal = set(config.target_parameters), _internal_ids(model)
    found, seen = [], []
    for name, module in model.named_modules():
        if id(module) in internal or isinstance(module, AdapterHolder):
            continue
        for pname, _ in module.named_parameters(recurse=False):
            key = f"{_strip_base(name)}.{pname}" if name else pname
            seen.append(key)
            if _matches(key, wanted):
                if not name:
                    raise ValueError(f"target_parameters: '{pname}' belongs to the top-level model itself, "
                                     "which cannot be wrapped; target a parameter of a submodule.")
                found.append((name, pname, key))
    if not found:
        close = sorted({c for w in wanted for c in difflib.get_close_matches(w, seen, n=5, cutoff=0.4)})
        raise ValueError(
            f"target_parameters={sorted(wanted)} matched no parameter of the model. Parameters that "
            f"look close: {close or seen[:8]}. Use names (or dotted suffixes) from model.named_parameters().")
    return found


def _top_name(model: nn.Module, owner_name: str) -> str:
    """Name of the outermost ParamLora around the module at `owner_name` (the name itself if unwrapped)."""
    name = owner_name
    while (name.endswith(".base_layer")
           and isinstance(model.get_submodule(name[: -len(".base_layer")]), ParamLora)):
        name = name[: -len(".base_layer")]
    if (name.endswith(".base_layer")
        and isinstance(model.get_submodule(name[: -len(".base_layer")]), AdapterLayer)):
        layer_name = name[: -len(".base_layer")]
        raise ValueError(
            f"target_parameters: module '{layer_name}' is already adapted through target_modules; a "
            "module cannot be targeted both ways. Remove it from target_modules (or set target_modules=[]).")
    return name


def _existing_wrapper(module: nn.Module, pname: str) -> ParamLora | None:
    while isinstance(module, ParamLora):
        if module.parameter_name == pname:
            return module
        module = module.base_layer
    return None


def parameter_targets(model: nn.Module, config, module_names: set[str]) -> list[tuple[str, object]]:
    """Tuner targets for `config.target_parameters`: (key, existing ParamLora) to update, (name, ParamTarget)
    to add.

    `module_names` are the modules targeted through target_modules in the same adapter (they may not own
    targets).
    """
    groups: dict[str, ParamTarget] = {}
    updates: list[tuple[str, object]] = []
    for owner_name, pname, key in matched_parameters(model, config):
        top = _top_name(model, owner_name)
        if top in module_names:
            raise ValueError(
                f"target_parameters: '{key}' lives in module '{top}', which target_modules targets "
                "too; a module cannot be targeted both ways. Drop it from one of the two options.")
        existing = _existing_wrapper(model.get_submodule(top), pname)
        if existing is not None:
            updates.append((key, existing))  # the name only feeds rank_pattern / alpha_pattern lookups
        else:
            groups.setdefault(top, ParamTarget(model.get_submodule(top))).params.append((pname, key))
    return updates + list(groups.items())


def check_same_parameters(peft_config: dict, config) -> None:
    """All adapters using target_parameters must target the same parameters (they share the nested
    wrappers)."""
    wanted = set(config.target_parameters or ())
    for name, other in peft_config.items():
        theirs = set(getattr(other, "target_parameters", None) or ())
        if other is not config and wanted and theirs and theirs != wanted:
            raise ValueError(f"All adapters using target_parameters must target the same parameters: got "
                             f"{sorted(wanted)} for the new adapter and {sorted(theirs)} "
                             f"for adapter '{name}'.")


def refuse_weighted(peft_config: dict, adapters: list[str]) -> None:
    for name in adapters:
        if getattr(peft_config.get(name), "target_parameters", None):
            raise ValueError(
                f"add_weighted_adapter does not support adapters using target_parameters ('{name}').")


def needs_default_modules(model: nn.Module, config, table: dict) -> bool:
    """target_modules=None is filled from the model type's defaults; with target_parameters only if one
    exists."""
    return not config.target_parameters or model_type_of(model) in table
