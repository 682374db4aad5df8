"""Training helpers with HF PEFT's names: `prepare_model_for_kbit_training`, model/layer status."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .core.layer import AdapterLayer


def _is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
                or getattr(model, "quantization_method", None) or getattr(model, "hf_quantizer", None))


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """Freeze the base and upcast half-precision params to fp32; for quantized models also enable input
    gradients and gradient checkpointing (frozen quantized weights otherwise leave adapters without grads)."""
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16) and param.__class__.__name__ == "Parameter":
            param.data = param.data.float()
    if use_gradient_checkpointing and _is_quantized(model):
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        if hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs or {})
    return model


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | str]
    available_adapters: list[str]
    devices: dict[str, list[str]] = field(default_factory=dict)


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One status row per adapter layer."""
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, AdapterLayer):
            continue
        grads: dict[str, bool | str] = {}
        devices: dict[str, list[str]] = {}
        for adapter in sorted(module.adapter_names()):
            flags = {p.requires_grad for _, p in module.adapter_parameters(adapter)}
            grads[adapter] = flags.pop() if len(flags) == 1 else "irregular"
            devices[adapter] = sorted({str(p.device) for _, p in module.adapter_parameters(adapter)})
        rows.append(TunerLayerStatus(
            name=name, module_type=f"{type(module).__module__.split('.')[-2]}.{type(module).__name__}",
            enabled=not module.disable_adapters, active_adapters=module.active_adapters,
            merged_adapters=list(module.merged_adapters), requires_grad=grads,
            available_adapters=sorted(module.adapter_names()), devices=devices))
    return rows


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | str
    active_adapters: list[str] | str
    merged_adapters: list[str] | str
    requires_grad: dict[str, bool | str]
    available_adapters: list[str]


def _agree(values: list, default):
    unique = {repr(v): v for v in values}
    return default if not unique else (next(iter(unique.values())) if len(unique) == 1 else "irregular")


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """Summary of the adapters over all layers ("irregular" where layers disagree)."""
    from .peft_model import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    layers = get_layer_status(model)
    configs = getattr(model, "peft_config", {}) or {}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    grads: dict[str, bool | str] = {}
    for row in layers:
        for adapter, flag in row.requires_grad.items():
            grads[adapter] = flag if grads.get(adapter, flag) == flag else "irregular"
    return TunerModelStatus(
        base_model_type=type(base).__name__, adapter_model_type=type(model).__name__,
        peft_types={k: getattr(v.peft_type, "value", v.peft_type) for k, v in configs.items()},
        trainable_params=trainable, total_params=sum(p.numel() for p in model.parameters()),
        num_adapter_layers=len(layers), enabled=_agree([r.enabled for r in layers], True),
        active_adapters=_agree([r.active_adapters for r in layers], []),
        merged_adapters=_agree([r.merged_adapters for r in layers], []), requires_grad=grads,
        available_adapters=sorted({a for r in layers for a in r.available_adapters}))
