"""Adapter hot-swapping (HF PEFT's `peft.utils.hotswap` API): new weights into a loaded adapter, in place.

Tensors keep their identity (values are copied), so a `torch.compile`d model keeps its graph; after
`prepare_model_for_compiled_hotswap` (per-layer scaling held in 0-dim tensors, ranks zero-padded to
`target_rank`) adapters of other ranks and alphas swap in without recompilation.

Generic over methods: a method that supports hot-swapping states its `SwapRule` in its MethodSpec (`hotswap`);
LoRA's is in methods/lora/hotswap.py.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .checkpoint import io
from .checkpoint.keys import adapter_key_map
from .config import PeftConfig
from .core.layer import AdapterHolder, AdapterLayer
from .registry import get_spec, registered

COMPILED_PREFIX = "_orig_mod."


@dataclass(frozen=True)
class SwapRule:
    """What hot-swapping needs to know about one method's layers."""

    # config fields that must agree between the loaded and the new adapter: (field, why it matters)
    config_keys: tuple[tuple[str, str], ...]
    # adapter parameter attribute (as in `adapter_param_names`) -> dimension of its weight that holds the rank
    rank_dims: dict[str, int]
    # per-adapter layer dicts set from the new config: settings(config, pattern key) -> {attribute: value}
    settings: Callable[[object, str], dict[str, float]]
    # of those, the ones read in forward: held as 0-dim tensors after prepare so new values need no recompile
    compiled_settings: tuple[str, ...] = field(default=())

    def applies_to(self, layer: nn.Module) -> bool:
        return isinstance(layer, AdapterLayer) and all(
            isinstance(getattr(layer, attr, None), dict) for attr in self.compiled_settings)


# ---------------------------------------------------------------------------------------------- helpers
def _unwrap(model: nn.Module) -> nn.Module:
    """The module under a `torch.compile` wrapper (OptimizedModule keeps it as `_orig_mod`)."""
    return getattr(model, "_orig_mod", model)


def _is_compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod") or bool(getattr(model, "_compiled_call_impl", None))


def _rules() -> dict:
    """PeftType -> SwapRule of every registered method that declares hot-swap rules."""
    return {peft_type: spec.hotswap for peft_type, spec in registered().items() if spec.hotswap is not None}


def _rule(peft_type) -> SwapRule:
    try:
        rule = get_spec(peft_type).hotswap
    except ValueError:
        rule = None
    if rule is None:
        name = getattr(peft_type, "value", peft_type)
        supported = ", ".join(sorted(t.value for t in _rules()))
        raise ValueError(f"{name} adapters cannot be hot-swapped: hot-swapping supports the methods that "
                         f"declare hot-swap rules in their MethodSpec ({supported}). Load the adapter with "
                         "load_adapter() under a new name and switch with set_adapter() instead.")
    return rule


def _configs(model: nn.Module) -> dict:
    configs = getattr(model, "peft_config", None)
    return configs if isinstance(configs, dict) else {}


def _holders(model: nn.Module, adapter_name: str):
    """(module name, holder) of every adapter holder that has adapter `adapter_name`."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterHolder) and adapter_name in module.adapter_names():
            yield name, module


def _pattern_keys(model: nn.Module) -> dict[int, str]:
    """id(layer) -> module name used for rank / alpha patterns (a nested layer uses its owner's, as on
    injection)."""
    keys: dict[str, str] = {}
    out: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            owner = [k for k in keys if name.startswith(k + ".")] if module.nested else []
            keys[name] = keys[max(owner, key=len)] if owner else name
            out[id(module)] = keys[name]
    return out


def _check_present(model: nn.Module, adapter_name: str) -> None:
    if not any(True for _ in _holders(model, adapter_name)):
        loaded = sorted(set(_configs(model)) | {n for m in model.modules() if isinstance(m, AdapterHolder)
                                                for n in m.adapter_names()})
        raise ValueError(
            f"No adapter named '{adapter_name}' is loaded (loaded: {loaded}). Hot-swapping replaces the "
            "weights of an adapter already in the model: load the first one (PeftModel.from_pretrained / "
            "load_adapter), then hot-swap into that name.")
    merged = [n for n, m in model.named_modules()
              if isinstance(m, AdapterLayer) and adapter_name in m.merged_adapters]
    if merged:
        raise ValueError(
            f"Adapter '{adapter_name}' is merged into the base weights (e.g. '{merged[0]}'); call "
            "unmerge_adapter() before hot-swapping, or the unmerge would subtract the wrong weights.")


def check_hotswap_configs_compatible(config0: PeftConfig, config1: PeftConfig) -> None:
    """Raise ValueError when the loaded adapter's config (`config0`) and the new one's cannot be swapped."""
    type0, type1 = (getattr(c.peft_type, "value", c.peft_type) for c in (config0, config1))
    if type0 != type1:
        raise ValueError(f"Cannot hot-swap a {type1} adapter into a {type0} adapter; load it with "
                         "load_adapter() under a new name instead.")
    for key, why in _rule(type0).config_keys:
        old, new = getattr(config0, key, None), getattr(config1, key, None)
        if old != new:
            raise ValueError(
                f"Cannot hot-swap: {key}={old!r} for the loaded adapter but {new!r} for the new one ({why}). "
                f"Swap only adapters trained with the same {key}, or load this one with "
                "load_adapter() under a new name.")


# ---------------------------------------------------------------------------------------------- rank padding
def _rank_geometry(rule: SwapRule, holder: AdapterHolder, local_key: str, param: torch.Tensor):
    """(rank dim, blocks, rank per unit of that dim) of an adapter tensor; None if it holds no rank."""
    dim = rule.rank_dims.get(local_key.split(".", 1)[0]) if rule.applies_to(holder) else None
    if dim is None or param.dim() < 2:
        return None
    groups = getattr(holder.get_base_layer(), "groups", 1) or 1
    # grouped convs: A's rows form one block per group; B (grouped) stores rank / groups per group in dim 1
    return (dim, groups, 1) if dim == 0 else (dim, 1, groups)


def _embed(dst: torch.Tensor, src: torch.Tensor, dim: int, blocks: int) -> None:
    """Zero `dst` and copy `src` into it along `dim`, block by block (the rest of `dst` stays zero)."""
    dst.zero_()
    d, s = dst.shape[dim] // blocks, src.shape[dim] // blocks
    for j in range(blocks):
        dst.narrow(dim, j * d, s).copy_(src.narrow(dim, j * s, s))


def _sync_shape_attrs(module: nn.Module) -> None:
    """Keep `in_features` / `out_channels`-style attributes true after a weight changed shape."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels, module.in_channels = weight.shape[0], weight.shape[1] * module.groups


def _owner(holder: nn.Module, local_key: str) -> nn.Module:
    prefix = local_key.rpartition(".")[0]
    return holder.get_submodule(prefix) if prefix else holder


# ---------------------------------------------------------------------------------------------- prepare
def _rule_for(layer: nn.Module) -> SwapRule | None:
    return next((rule for rule in _rules().values() if rule.applies_to(layer)), None)


def _needs_padding(where: str, adapter: str, param: torch.Tensor, geo, target_rank: int) -> bool:
    dim, blocks, per_unit = geo
    groups = max(blocks, per_unit)
    if target_rank % groups:
        raise ValueError(f"target_rank={target_rank} is not divisible by the groups ({groups}) of the "
                         f"grouped convolution '{where}'; pick a multiple of {groups}.")
    rank = param.shape[dim] * per_unit
    if rank > target_rank:
        raise ValueError(f"target_rank={target_rank} is smaller than the rank {rank} of adapter '{adapter}' "
                         f"at '{where}'. Pass the largest rank among the adapters you will hot-swap in.")
    return rank < target_rank


def _padding_plan(model: nn.Module, target_rank: int) -> list[tuple]:
    """(layer, local key, param, geometry) of every adapter tensor to pad; raises before anything changes."""
    plan = []
    for name, layer in model.named_modules():
        rule = _rule_for(layer)
        for adapter in sorted(layer.adapter_names()) if rule else ():
            for local_key, param in layer.adapter_parameters(adapter):
                geo = _rank_geometry(rule, layer, local_key, param)
                if geo is not None and _needs_padding(name, adapter, param, geo, target_rank):
                    plan.append((layer, local_key, param, geo))
    return plan


def _pad(layer: nn.Module, local_key: str, param: nn.Parameter, geo, target_rank: int) -> None:
    dim, blocks, per_unit = geo
    shape = list(param.shape)
    shape[dim] = target_rank // per_unit
    padded = torch.zeros(shape, dtype=param.dtype, device=param.device)
    with torch.no_grad():
        _embed(padded, param.data, dim, blocks)
    param.data = padded  # same Parameter object (optimizers and references stay valid)
    _sync_shape_attrs(_owner(layer, local_key))


def _settings_to_tensors(model: nn.Module) -> bool:
    """Hold forward-read settings (LoRA's scaling) in 0-dim tensors; True if any adapter layer was found."""
    found = False
    for layer in model.modules():
        rule = _rule_for(layer)
        if rule is None:
            continue
        found = True
        device = next((p.device for p in layer.get_base_layer().parameters()), None)
        for attr in rule.compiled_settings:
            values = getattr(layer, attr)
            for adapter, value in values.items():
                if not isinstance(value, torch.Tensor):
                    values[adapter] = torch.tensor(float(value), device=device)
    return found


def _check_compiled_arg(model: nn.Module, check_compiled: str) -> None:
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiled must be 'error', 'warn' or 'ignore', got {check_compiled!r}.")
    if not _is_compiled(model) or check_compiled == "ignore":
        return
    message = ("prepare_model_for_compiled_hotswap was called on a model that is already compiled: padding "
               "and tensor scalings change what the graph was traced with, so it will recompile. Call it "
               "after loading the first adapter and before torch.compile.")
    if check_compiled == "error":
        raise ValueError(message)
    warnings.warn(message, stacklevel=3)


def prepare_model_for_compiled_hotswap(model: nn.Module, *, target_rank: int | None = None,
                                       config: PeftConfig | dict[str, PeftConfig] | None = None,
                                       check_compiled: str = "error") -> None:
    """Make later hot-swaps recompilation-free: call after loading the first adapter, before `torch.compile`.

    Per-layer scalings become 0-dim tensors (new alphas / ranks are written into them), and with `target_rank`
    every adapter's A / B are zero-padded to that rank (outputs unchanged), so any adapter of rank
    <= target_rank swaps in without a shape change. `config` (one config or a dict of them) gets `r`
    / `rank_pattern` set to `target_rank`. `check_compiled`: 'error' (default), 'warn' or 'ignore' when the
    model is already compiled.
    """
    _check_compiled_arg(model, check_compiled)
    inner = _unwrap(model)
    if target_rank is not None and (not isinstance(target_rank, int) or target_rank <= 0):
        raise ValueError(f"target_rank must be a positive int, got {target_rank!r}.")
    plan = _padding_plan(inner, target_rank) if target_rank is not None else []
    if not _settings_to_tensors(inner):
        raise ValueError("No LoRA layers found in the model: call prepare_model_for_compiled_hotswap after "
                         "loading the first adapter (and before compiling and hot-swapping).")
    for layer, local_key, param, geo in plan:
        _pad(layer, local_key, param, geo, target_rank)
    if config and target_rank is not None:
        for cfg in (config.values() if isinstance(config, dict) else [config]):
            cfg.r = target_rank
            cfg.rank_pattern = dict.fromkeys(cfg.rank_pattern or {}, target_rank)


# ---------------------------------------------------------------------------------------------- swapping
@dataclass
class _SwapPlan:
    """Every write of one hot-swap, computed (and checked) before the first one happens."""

    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    embeds: list[tuple[torch.Tensor, torch.Tensor, int, int]] = field(default_factory=list)
    replaces: list[tuple[nn.Module, str, nn.Parameter, torch.Tensor]] = field(default_factory=list)
    zeros: list[torch.Tensor] = field(default_factory=list)
    settings: list[tuple[nn.Module, str, str, float]] = field(default_factory=list)


def _resolve_keys(model: nn.Module, state_dict: dict, adapter_name: str) -> dict[str, torch.Tensor]:
    """{model parameter name: new value}; state-dict keys may be as in the model or as in adapter files."""
    mapping = adapter_key_map(model, adapter_name, _configs(model).get(adapter_name))
    model_keys = set(mapping.values())
    resolved, unexpected = {}, []
    for key, value in state_dict.items():
        key = key.removeprefix(COMPILED_PREFIX)
        model_key = key if key in model_keys else mapping.get(key)
        if model_key is None:
            unexpected.append(key)
        else:
            resolved[model_key] = value
    if unexpected:
        shown = ", ".join(sorted(unexpected)[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise RuntimeError(
            "Hot-swap failed, nothing was changed: the new adapter has weights that adapter "
            f"'{adapter_name}' lacks ({len(unexpected)}: {shown}). It targets other modules (or another base "
            "model); hot-swapping cannot add layers. Load it with load_adapter() under a new name, or load "
            "first an adapter whose target_modules include these modules.")
    if not resolved:
        raise ValueError(f"The state dict holds no weights of adapter '{adapter_name}'; nothing was swapped.")
    return resolved


def _is_padded(rule: SwapRule, holder: nn.Module, adapter_name: str) -> bool:
    return rule.applies_to(holder) and any(
        isinstance(getattr(holder, attr).get(adapter_name), torch.Tensor) for attr in rule.compiled_settings)


def _plan_tensor(plan: _SwapPlan, rule: SwapRule, holder, local_key: str, param, value, adapter_name: str,
                 key: str) -> None:
    value = value.detach().to(device=param.device, dtype=param.dtype)
    if value.shape == param.shape:
        plan.copies.append((param, value))
        return
    geo = _rank_geometry(rule, holder, local_key, param) if holder is not None else None
    dim = geo[0] if geo else None
    others_match = geo is not None and value.dim() == param.dim() and all(
        a == b for i, (a, b) in enumerate(zip(value.shape, param.shape)) if i != dim)
    if not others_match:
        raise ValueError(
            f"Hot-swap failed, nothing was changed: '{key}' has shape {tuple(value.shape)} in the new "
            f"adapter but {tuple(param.shape)} in the model, so it was made for a different base "
            "model or layer type.")
    if value.shape[dim] < param.shape[dim]:
        plan.embeds.append((param, value, dim, geo[1]))
    elif _is_padded(rule, holder, adapter_name):
        new_rank, cur_rank = value.shape[dim] * geo[2], param.shape[dim] * geo[2]
        raise ValueError(
            f"Hot-swap failed, nothing was changed: '{key}' has rank {new_rank}, larger than the rank "
            f"{cur_rank} the model holds after prepare_model_for_compiled_hotswap. Call "
            f"prepare_model_for_compiled_hotswap with target_rank >= {new_rank} (the largest rank you will "
            "swap in) before compiling.")
    else:  # not prepared for compilation: the tensor may grow (same Parameter object, new storage)
        plan.replaces.append((holder, local_key, param, value.clone()))


def _plan_weights(model: nn.Module, rule: SwapRule, values: dict, adapter_name: str, plan: _SwapPlan) -> None:
    owned = set()
    for prefix, holder in _holders(model, adapter_name):
        for local_key, param in holder.adapter_tensors(adapter_name):
            key = f"{prefix}.{local_key}" if prefix else local_key
            owned.add(key)
            if key in values:
                _plan_tensor(plan, rule, holder, local_key, param, values[key], adapter_name, key)
            else:  # the new adapter leaves this module alone: its update must vanish
                plan.zeros.append(param)
    params = model.state_dict(keep_vars=True)
    for key in sorted(set(values) - owned):  # base tensors the adapter trains (LoRA's bias option)
        _plan_tensor(plan, rule, None, "", params[key], values[key], adapter_name, key)


def _plan_settings(model: nn.Module, rule: SwapRule, config, adapter_name: str, plan: _SwapPlan) -> None:
    keys = _pattern_keys(model)
    for _, layer in _holders(model, adapter_name):
        if rule.applies_to(layer):
            for attr, value in rule.settings(config, keys[id(layer)]).items():
                plan.settings.append((layer, attr, adapter_name, value))


def _apply(plan: _SwapPlan) -> None:
    with torch.no_grad():
        for param, value in plan.copies:
            param.data.copy_(value)
        for param, value, dim, blocks in plan.embeds:
            _embed(param.data, value, dim, blocks)
        for param in plan.zeros:
            param.data.zero_()
        for holder, local_key, param, value in plan.replaces:
            param.data = value
            _sync_shape_attrs(_owner(holder, local_key))
        for layer, attr, adapter_name, value in plan.settings:
            values = getattr(layer, attr)
            if isinstance(values.get(adapter_name), torch.Tensor):
                values[adapter_name].fill_(value)
            else:
                values[adapter_name] = value


def hotswap_adapter_from_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str,
                                    config: PeftConfig, parameter_prefix: str = "lora_") -> None:
    """Write `state_dict` (keys as in the model or as in adapter files) into the loaded adapter
    `adapter_name`.

    `config` is the new adapter's config (its rank / alpha give the new scaling). Modules the new adapter does
    not cover get a zero update. Raises, leaving the model unchanged, if the adapter is missing or merged, the
    weights target other modules, or a rank exceeds the padded rank. `parameter_prefix` is accepted for HF
    PEFT compatibility; keys are matched through the layers' declared parameters.
    """
    inner = _unwrap(model)
    _check_present(inner, adapter_name)
    rule = _rule(config.peft_type)
    values = _resolve_keys(inner, state_dict, adapter_name)
    plan = _SwapPlan()
    _plan_weights(inner, rule, values, adapter_name, plan)
    _plan_settings(inner, rule, config, adapter_name, plan)
    _apply(plan)


def hotswap_adapter(model: nn.Module, model_name_or_path: str, adapter_name: str,
                    torch_device: str | None = None, **kwargs) -> None:
    """Replace the weights (and scaling) of loaded adapter `adapter_name` with those saved at
    `model_name_or_path`.

    The adapter keeps its name, parameters and modules; compiled models need no recompilation when ranks and
    alphas match (or after `prepare_model_for_compiled_hotswap`). kwargs go to the config / weight loading
    (`subfolder`, `revision`, `token`, ...).
    """
    inner = _unwrap(model)
    _check_present(inner, adapter_name)
    hub_kwargs, _ = io.split_hub_kwargs(kwargs)
    config = PeftConfig.from_pretrained(model_name_or_path, **kwargs)
    loaded = _configs(inner).get(adapter_name)
    if loaded is not None:
        check_hotswap_configs_compatible(loaded, config)
    state_dict = io.load_peft_weights(model_name_or_path, device=torch_device, **hub_kwargs)
    hotswap_adapter_from_state_dict(inner, state_dict, adapter_name, config)
