"""Loading X-LoRA's experts: the LoRA adapters named in `XLoraConfig.adapters`, as adapters "0", "1", ...
of one LoraModel around the user's model (HF PEFT's layout, so parameter names match:
`lora_model.model.<path>.lora_A.<i>.weight`).

Every expert's config and weights are read and checked before the model is touched; the injection runs in
the caller's transaction, so a failure on any expert leaves the model as it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ...checkpoint import io
from ...checkpoint.keys import set_peft_model_state_dict
from ...config import PeftConfig
from ...errors import AdapterLoadError
from ..lora.config import LoraConfig
from ..lora.layer import Embedding, Linear
from ..lora.model import LoraModel
from ..lora.variants import table as variants_table

# LoRA files key tensors as base_model.model.<path>; inside the LoraModel they are model.<path>
FILE_PREFIX = "base_model."


@dataclass
class Expert:
    name: str  # the adapter name inside the LoraModel: str(index), as HF PEFT
    label: str  # its key in XLoraConfig.adapters (for messages)
    source: str
    config: LoraConfig
    tensors: dict[str, torch.Tensor]


def _refused_options(config: LoraConfig) -> list[str]:
    """LoRA options that change more than the plain LoRA layers (X-LoRA mixes those layers only)."""
    options = ("modules_to_save", "trainable_token_indices", "layer_replication", "target_parameters",
               "ensure_weight_tying")
    found = [o for o in options if getattr(config, o, None)]
    if config.bias != "none":
        found.append(f"bias={config.bias!r}")
    return found + [f"{row.option} (a LoRA variant)" for row in variants_table.VARIANTS if row.active(config)]


def _read_config(label: str, source: str, hub_kwargs: dict) -> LoraConfig:
    looks_local = os.path.isabs(source) or source.startswith((".", "~"))
    if looks_local and not os.path.isdir(os.path.expanduser(source)):
        raise AdapterLoadError(
            f"X-LoRA expert {label!r}: the folder {source!r} does not exist. XLoraConfig.adapters must map "
            "each expert to a LoRA adapter folder (or Hub id) written by save_pretrained; fix the path in "
            "the config (adapter_config.json of a saved X-LoRA model keeps the paths it was built with).")
    try:
        config = PeftConfig.from_pretrained(source, **hub_kwargs)
    except Exception as err:
        raise AdapterLoadError(f"X-LoRA expert {label!r}: cannot read the LoRA config at {source!r}: {err}") \
            from err
    if type(config) is not LoraConfig:  # AdaLoRA's config subclasses it, but its layers are not LoRA's
        raise ValueError(
            f"X-LoRA expert {label!r} at {source!r} is a {config.peft_type} adapter; X-LoRA mixes LoRA "
            "adapters only (peft_type LORA).")
    return config


def _check_options(label: str, config: LoraConfig) -> None:
    refused = _refused_options(config)
    if refused:
        raise NotImplementedError(
            f"X-LoRA expert {label!r} uses {refused}: X-LoRA mixes plain LoRA layers only (as HF "
            "PEFT, whose X-LoRA layers refuse DoRA). Use experts trained without these options.")


def read_experts(adapters: dict[str, str], hub_kwargs: dict, device: str | None) -> list[Expert]:
    """Every expert's config and weights, checked, before anything is built."""
    if not adapters:
        raise ValueError("XLoraConfig.adapters is empty: name at least one LoRA adapter folder as an expert, "
                         "e.g. adapters={'0': 'path/to/lora_0', '1': 'path/to/lora_1'}.")
    experts = []
    for index, (label, source) in enumerate(adapters.items()):
        source = os.fspath(source)
        config = _read_config(label, source, hub_kwargs)
        _check_options(label, config)
        config.inference_mode = False
        tensors = io.load_peft_weights(source, device=device or "cpu", **hub_kwargs)
        bad = sorted(k for k in tensors if not k.startswith(FILE_PREFIX + "model."))
        if bad:
            raise AdapterLoadError(
                f"X-LoRA expert {label!r} at {source!r} has tensors outside the model ({bad[:3]}); expected "
                "LoRA adapter keys 'base_model.model.<module>.lora_A.weight'.")
        tensors = {k[len(FILE_PREFIX):]: v for k, v in tensors.items()}
        experts.append(Expert(str(index), str(label), source, config, tensors))
    return experts


def build_lora_model(model: nn.Module, experts: list[Expert], autocast_adapter_dtype: bool,
                     low_cpu_mem_usage: bool) -> LoraModel:
    """Inject every expert into one LoraModel and load its weights (inside the caller's transaction)."""
    first = experts[0]
    lora_model = LoraModel(model, {first.name: first.config}, first.name,
                           autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage)
    _load(lora_model, first)
    for expert in experts[1:]:
        lora_model.peft_config[expert.name] = expert.config
        lora_model.inject_adapter(model, expert.name, autocast_adapter_dtype=autocast_adapter_dtype,
                                  low_cpu_mem_usage=low_cpu_mem_usage)
        _load(lora_model, expert)
    _check_layer_kinds(lora_model)
    return lora_model


def _load(lora_model: LoraModel, expert: Expert) -> None:
    result = set_peft_model_state_dict(lora_model, expert.tensors, adapter_name=expert.name)
    if result.unexpected_keys or result.missing_keys:
        raise AdapterLoadError(
            f"X-LoRA expert {expert.label!r} at {expert.source!r} does not fit its config on this model:\n"
            f"{result.describe()}\nLoad experts trained on this base model.")
    lora_model.place_loaded(expert.name)


def _check_layer_kinds(lora_model: LoraModel) -> None:
    """X-LoRA's forward exists for LoRA's linear (incl. Conv1D) and embedding layers (HF PEFT also wraps
    Conv2d, but scales its (batch, channels, h, w) input with (batch, seq) scalings: refused here)."""
    other = sorted({f"{name} ({type(layer).__name__})" for name, layer in lora_model.holders()
                    if not isinstance(layer, (Linear, Embedding))})
    if other:
        raise NotImplementedError(
            f"X-LoRA experts adapt layers X-LoRA cannot mix: {other[:5]}. Use experts that target linear "
            "(or embedding) layers only.")
