"""Training helpers with HF PEFT's names: `prepare_model_for_kbit_training`, model/layer status."""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .core.layer import AdapterLayer
from .quant.bnb import logical_numel

# quantisation methods whose weights must keep their dtype (HF PEFT leaves their params alone)
_KEEP_DTYPE_METHODS = ("gptq", "aqlm", "eetq", "torchao", "hqq")


def _quant_method(model: nn.Module) -> str | None:
    method = getattr(model, "quantization_method", None)
    method = getattr(method, "value", method)  # transformers' QuantizationMethod enum -> its string
    return "hqq" if getattr(model, "hqq_quantized", False) else method


def _upcast_half_params(model: nn.Module) -> None:
    """float16 / bfloat16 parameters to float32 (layer norms, embeddings, head; packed 4-bit weights
    excepted)."""
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
            param.data = param.data.to(torch.float32)


def _inputs_require_grad(model: nn.Module) -> None:
    """Make the embedding output require grad, so checkpointed blocks over frozen weights still
    backpropagate."""
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return
    model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: output.requires_grad_(True))


def _enable_checkpointing(model: nn.Module, kwargs: dict) -> None:
    enable = model.gradient_checkpointing_enable
    if "gradient_checkpointing_kwargs" in inspect.signature(enable).parameters:
        enable(gradient_checkpointing_kwargs=kwargs)
        return
    if kwargs:
        warnings.warn("This transformers version's gradient_checkpointing_enable takes no "
                      "gradient_checkpointing_kwargs; they are ignored (upgrade transformers to use them).",
                      FutureWarning, stacklevel=3)
    enable()


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None,
                                    auto_clear_cache: bool = True) -> nn.Module:
    """Get a (k-bit quantised) transformers model ready for adapter training, with HF PEFT's semantics:

    1. every parameter is frozen;
    2. unless the weights come from GPTQ / AQLM / EETQ / torchao / HQQ, fp16 / bf16 parameters (layer norms,
       embeddings, the head; not the packed 4-bit weights) are upcast to float32 for stable training, then the
       accelerator's cache is emptied if `auto_clear_cache`;
    3. for models loaded in 8 / 4 bit (or by those methods) with `use_gradient_checkpointing`: the embedding
       output requires grad (unless `gradient_checkpointing_kwargs` sets `use_reentrant=False`, which needs no
       such help) and gradient checkpointing is enabled with `gradient_checkpointing_kwargs`.
    """
    kwargs = dict(gradient_checkpointing_kwargs or {})
    method = _quant_method(model)
    kbit = bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))
    for param in model.parameters():
        param.requires_grad_(False)
    if method not in _KEEP_DTYPE_METHODS:
        _upcast_half_params(model)
        if auto_clear_cache:
            _empty_accelerator_cache()
    if (kbit or method in _KEEP_DTYPE_METHODS) and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            _inputs_require_grad(model)
        _enable_checkpointing(model, kwargs)
    return model


def _empty_accelerator_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        xpu.empty_cache()


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
    quantization_backend: str | None = None


def _tuner_root(model: nn.Module) -> nn.Module:
    """Layer names are reported relative to the tuner (`model.model.layers...`), as HF PEFT does."""
    from .peft_model import PeftModel

    return model.base_model if isinstance(model, PeftModel) else model


def _agree(flags: set) -> bool | str:
    return flags.pop() if len(flags) == 1 else "irregular"


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One status row per adapter layer."""
    rows = []
    for name, module in _tuner_root(model).named_modules():
        if not isinstance(module, AdapterLayer):
            continue
        adapters = sorted(module.adapter_names())
        params = {a: [p for _, p in module.adapter_parameters(a)] for a in adapters}
        rows.append(TunerLayerStatus(
            name=name, module_type=f"{type(module).__module__.split('.')[-2]}.{type(module).__name__}",
            enabled=not module.disable_adapters, active_adapters=module.active_adapters,
            merged_adapters=list(module.merged_adapters),
            requires_grad={a: _agree({p.requires_grad for p in params[a]}) for a in adapters},
            available_adapters=adapters, devices={a: sorted({p.device.type for p in params[a]})
                                                  for a in adapters}))
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
    devices: dict[str, list[str]] = field(default_factory=dict)
    quantization_backend: str | None = None


def _merged(layers: list[TunerLayerStatus]) -> list[str] | str:
    """Adapters merged in some layer; "irregular" if one of them is unmerged in a layer that has it."""
    merged = sorted({a for row in layers for a in row.merged_adapters})
    for row in layers:
        if (set(row.available_adapters) - set(row.merged_adapters)) & set(merged):
            return "irregular"
    return merged


def _collect(layers: list[TunerLayerStatus], attr: str) -> dict:
    out: dict = {}
    for row in layers:
        for adapter, value in getattr(row, attr).items():
            out.setdefault(adapter, []).append(value)
    return out


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """Summary of the adapters over all layers ("irregular" where layers disagree)."""
    from .peft_model import PeftModel

    is_peft = isinstance(model, PeftModel)
    base = model.get_base_model() if is_peft else model
    layers = get_layer_status(model)
    actives = {tuple(row.active_adapters) for row in layers}
    grads = {a: (v[0] if all(x is v[0] for x in v) and v[0] in (True, False) else "irregular")
             for a, v in _collect(layers, "requires_grad").items()}
    return TunerModelStatus(
        base_model_type=type(base).__name__ if is_peft or hasattr(base, "config") else "other",
        adapter_model_type=type(model.tuner).__name__ if is_peft else "None",
        peft_types={k: getattr(v.peft_type, "value", v.peft_type) for k, v in model.peft_config.items()}
        if is_peft else {},
        trainable_params=sum(logical_numel(p) for p in model.parameters() if p.requires_grad),
        total_params=sum(logical_numel(p) for p in model.parameters()), num_adapter_layers=len(layers),
        enabled=_agree({row.enabled for row in layers}) if layers else True,
        active_adapters=(list(actives.pop()) if len(actives) == 1 else "irregular") if actives else [],
        merged_adapters=_merged(layers), requires_grad=grads,
        available_adapters=sorted({a for row in layers for a in row.available_adapters}),
        devices={a: sorted({d for ds in v for d in ds}) for a, v in _collect(layers, "devices").items()})


def _get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """(parent, module, attribute name) of the module at dotted path `key` (HF PEFT's helper of this name)."""
    parent_name, _, name = key.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), model.get_submodule(key), name


def infer_device() -> str:
    """The accelerator torch would use here ('cuda', 'xpu', 'mps', ...), else 'cpu'."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return accelerator.current_accelerator().type
    return "cuda" if torch.cuda.is_available() else "cpu"


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen parameters to `dtype` (fp16 / bf16 mixed-precision training), trainable ones to float32 (HF
    PEFT's helper of this name: half the memory for the frozen base, full precision where the optimizer
    steps)."""
    for param in model.parameters():
        param.data = param.data.to(dtype if not param.requires_grad else torch.float32)
