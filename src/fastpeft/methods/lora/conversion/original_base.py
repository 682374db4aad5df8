"""Save a trained PiSSA / OLoRA adapter as a plain LoRA adapter for the original (unmodified) base model.

With W = W_res + s B0 A0 at init and W_res + s B A after training, the update is
s (B A - B0 A0) = s [B | -B0] [A ; A0]: a rank-2r LoRA with the same scaling (PiSSA: Meng et al. 2024,
sec. 4).
"""

from __future__ import annotations

import copy
import os

import torch

from ....checkpoint import io
from ....checkpoint.keys import adapter_key_map
from ..config import modifies_base

# file keys of layer methods: PeftModel.base_model (tuner) .model (user's model)
FILE_PREFIX = "base_model.model."

# how each factor of the trained adapter is joined with its initial value
_JOIN = {
    "A": lambda t, t0: torch.cat([t, t0], dim=0),  # (2r, in...)
    "B": lambda t, t0: torch.cat([t, -t0], dim=1),  # (out, 2r, 1...)
    "bias": lambda t, t0: t - t0,  # lora_B's bias is added once: keep its change
}


def converted_file_state(tuner, adapter_name: str, tensors: dict[str, torch.Tensor], config_dict: dict,
                         initial_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config) of adapter `adapter_name` rewritten as plain LoRA relative to the adapter in
    `initial_dir`.

    `initial_dir` holds the adapter as saved right after `get_peft_model` (before training). As HF PEFT, its
    `adapter_config.json` is then rewritten with init_lora_weights=True so it loads as-is onto the residual
    model.
    """
    config = tuner.peft_config[adapter_name]
    _check_convertible(adapter_name, config)
    initial = io.load_peft_weights(str(initial_dir))
    roles = _factor_roles(tuner, adapter_name, config)
    out = {}
    for key, tensor in tensors.items():
        role = roles.get(key.removeprefix(FILE_PREFIX)) if key.startswith(FILE_PREFIX) else None
        if role is None:  # modules_to_save copies, trained biases: already absolute values
            out[key] = tensor
            continue
        ref = initial.get(key)
        if ref is None or ref.shape != tensor.shape:
            raise ValueError(
                f"The adapter in {str(initial_dir)!r} does not match adapter '{adapter_name}' at {key!r} "
                f"(found {None if ref is None else tuple(ref.shape)}, expected {tuple(tensor.shape)}). Pass "
                "the folder that save_pretrained wrote for this adapter right after "
                "get_peft_model, before training."
            )
        out[key] = _JOIN[role](tensor, ref.to(device=tensor.device, dtype=tensor.dtype)).contiguous()
    initial_config = copy.copy(config)
    initial_config.init_lora_weights = True
    initial_config.save_pretrained(str(initial_dir))
    return out, _converted_config(config_dict, config.use_rslora)


def _check_convertible(adapter_name: str, config) -> None:
    value = config.init_lora_weights
    # True: HF PEFT's documented workflow relabels a PiSSA adapter True before saving its initial state
    if not (value is True or modifies_base(value)):
        raise ValueError(
            "path_initial_model_for_weight_conversion converts PiSSA / OLoRA adapters and others that "
            "rewrite the base (init_lora_weights 'pissa', 'pissa_niter_K', 'olora', 'corda' or 'lora_ga'); "
            f"adapter '{adapter_name}' has init_lora_weights={value!r}, whose base model is unchanged: save "
            "it without path_initial_model_for_weight_conversion."
        )
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError(
            "path_initial_model_for_weight_conversion cannot be used with use_rslora=True together with "
            "rank_pattern / alpha_pattern (the doubled rank cannot keep every layer's "
            "scaling), as in HF PEFT."
        )


def _factor_roles(tuner, adapter_name: str, config) -> dict[str, str]:
    """{file key relative to the user's model: "A" / "B" / "bias"} for the LoRA factors of `adapter_name`."""
    factors = {}
    for layer in tuner.adapter_layers():
        if adapter_name not in layer.adapter_names() or not hasattr(layer, "lora_weights"):
            continue
        if getattr(layer.get_base_layer(), "groups", 1) > 1:
            raise ValueError("Cannot convert a LoRA adapter on a grouped convolution (groups > 1) on save.")
        a, b = layer.lora_weights(adapter_name)
        factors.update({id(a): "A", id(b): "B"})
        bias = layer.lora_B_bias(adapter_name)
        if bias is not None:
            factors[id(bias)] = "bias"
    params = dict(tuner.model.named_parameters())
    return {file_key: factors[id(params[model_key])]
            for file_key, model_key in adapter_key_map(tuner.model, adapter_name, config).items()
            if model_key in params and id(params[model_key]) in factors}


def _converted_config(config_dict: dict, use_rslora: bool) -> dict:
    """The saved config of the rank-2r adapter: same scaling alpha / r (rsLoRA: alpha / sqrt(r)), as HF
    PEFT."""
    data = dict(config_dict)
    data["init_lora_weights"] = True
    data["r"] = 2 * data["r"]
    data["lora_alpha"] = data["lora_alpha"] * (2 ** 0.5 if use_rslora else 2)
    data["rank_pattern"] = {k: 2 * v for k, v in (data.get("rank_pattern") or {}).items()}
    data["alpha_pattern"] = {k: 2 * v for k, v in (data.get("alpha_pattern") or {}).items()}
    return data
