"""Entry points: `get_peft_model`, `inject_adapter_in_model`, `get_peft_config`."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from .config import PeftConfig
from .core.layer import AdapterHolder
from .core.tuner import MERGED_SET_ADAPTER, check_adapter_name
from .peft_model import PeftModel, has_adapters, refuse_second_wrap
from .registry import get_spec
from .tasks import TASK_CLASSES


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    return PeftConfig.from_peft_type(**config_dict)


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                   mixed: bool = False, autocast_adapter_dtype: bool = True, revision: str | None = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Wrap `model` with a new, trainable adapter; the task class follows `peft_config.task_type`.

    `low_cpu_mem_usage=True` creates the adapter weights on the meta device (as HF PEFT): for loading weights
    into them next (`set_peft_model_state_dict`), not for training.
    """
    check_adapter_name(adapter_name)
    if mixed:  # adapters of several methods: checked (mixing/tuner.check_mixable) before the config changes
        from .mixing import PeftMixedModel
        from .mixing.tuner import check_mixable

        if isinstance(model, PeftModel):
            raise ValueError(
                "get_peft_model(..., mixed=True) got a PeftModel: pass its base model "
                "(peft_model.get_base_model(), after unload() if its adapters should go) or add the adapter "
                "to the PeftModel with add_adapter.")
        check_mixable(peft_config)
    else:
        refuse_second_wrap(model)
    peft_config.base_model_name_or_path = model.__dict__.get("name_or_path", None) or None
    if revision is not None:
        peft_config.revision = revision
    if mixed:  # as HF PEFT: autocast_adapter_dtype and low_cpu_mem_usage are not passed on
        return PeftMixedModel(model, peft_config, adapter_name)
    klass = TASK_CLASSES.get(getattr(peft_config.task_type, "value", peft_config.task_type), PeftModel)
    return klass(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                 low_cpu_mem_usage=low_cpu_mem_usage)


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, state_dict: dict | None = None) -> nn.Module:
    """Add adapter layers to `model` in place (no PeftModel wrapper) and return it.

    `low_cpu_mem_usage=True`: the adapter weights are created on the meta device, to be filled by
    `set_peft_model_state_dict` (diffusers loads adapters this way). `state_dict`: the adapter tensors about
    to be loaded; the modules they belong to are the targets (the config's target_modules are not matched).
    """
    spec = get_spec(peft_config.peft_type)
    if spec.tuner_cls is None:
        raise ValueError(f"{spec.peft_type.value} cannot be injected into a model: it transforms the inputs.")
    if not spec.tuner_cls.injectable:
        raise ValueError(
            f"inject_adapter_in_model does not support {spec.peft_type.value}: it keeps trained modules on "
            "the tuner, outside the model. Use get_peft_model(model, config) instead.")
    existing = _injected_configs(model, adapter_name, spec)
    tuner = spec.tuner_cls(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
                           state_dict=state_dict)
    if existing:  # as HF PEFT: adapters injected one after the other (diffusers) keep all their configs
        configs = {**existing, **tuner.peft_config}
        tuner.peft_config.clear()
        tuner.peft_config.update(configs)
    return tuner.model


def _injected_configs(model: nn.Module, adapter_name: str, spec) -> dict[str, PeftConfig]:
    """Configs of adapters injected into `model` before; refuse a PeftModel, a name in use or another
    method."""
    if isinstance(model, PeftModel):
        raise ValueError(
            "inject_adapter_in_model got a PeftModel: add the adapter with peft_model.add_adapter(name, "
            "config) (or load_adapter); inject_adapter_in_model is for plain models without a PeftModel "
            "wrapper."
        )
    if not has_adapters(model):
        return {}
    configs = model.__dict__.get("peft_config")
    configs = dict(configs) if isinstance(configs, dict) else {}
    names = set(configs).union(*(h.adapter_names() for h in model.modules() if isinstance(h, AdapterHolder)))
    if adapter_name in names:
        raise ValueError(
            f"The model already has an adapter named {adapter_name!r}: pass another adapter_name to "
            "inject_adapter_in_model (adapters are added side by side), or remove that one first "
            "(delete_adapter)."
        )
    methods = {get_spec(c.peft_type).peft_type.value for c in configs.values()}
    others = sorted(methods - {spec.peft_type.value})
    if others:
        raise ValueError(
            f"The model already has {others} adapters; inject_adapter_in_model adds {spec.peft_type.value} "
            "ones only to a model without adapters of another method (one method per model in fastpeft)."
        )
    return configs


# -------------------------------------------------------------------------------------------- peft.functional
def _holders(model: nn.Module, layer_cls: type | None):
    wanted = AdapterHolder if layer_cls is None else layer_cls
    return [m for m in model.modules() if isinstance(m, wanted) and isinstance(m, AdapterHolder)]


def set_adapter(model: nn.Module, adapter_name: str | list[str], inference_mode: bool = False,
                layer_cls: type | None = None) -> None:
    """Activate `adapter_name` in every adapter layer of `model` (trainable unless `inference_mode`); a layer
    with merged adapters is unmerged first (with a warning, as HF PEFT)."""
    for holder in _holders(model, layer_cls):
        if getattr(holder, "merged", False):
            warnings.warn(MERGED_SET_ADAPTER, stacklevel=2)
            holder.unmerge()
        holder.set_adapter(adapter_name, inference_mode=inference_mode)


def delete_adapter(model: nn.Module, adapter_name: str, prefix: str | None = None,
                   layer_cls: type | None = None) -> list[str] | None:
    """Remove `adapter_name` from every adapter layer of `model`; returns the active adapters left (of the
    first layer that had it), None if no layer had it. `prefix` (the method's parameter prefix) is accepted
    for HF PEFT's signature: fastpeft's layers know their own parameters. `model.peft_config` is left to the
    caller."""
    remaining = None
    for holder in _holders(model, layer_cls):
        if adapter_name in holder.adapter_names():
            holder.delete_adapter(adapter_name)
            if remaining is None:
                remaining = list(getattr(holder, "active_adapters", []))
    return remaining


def set_requires_grad(model: nn.Module, adapter_names: str | list[str], requires_grad: bool = True) -> None:
    """Turn gradients of the named adapters' parameters on or off in every adapter layer of `model`."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    for holder in _holders(model, None):
        for name in names:
            for _, param in holder.adapter_parameters(name):
                param.requires_grad_(requires_grad)
