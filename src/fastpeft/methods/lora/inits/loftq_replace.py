"""`replace_lora_weights_loftq`: LoftQ for a LoRA model whose base model is already quantised to 4 bits with
bitsandbytes (HF PEFT 0.21's function of that name, same signature and results).

LoftQ (Li et al. 2023, https://arxiv.org/abs/2310.08659) fits the adapter to the quantisation error. Here the
base is quantised already, so one round of its Algorithm 1 remains: for every LoRA layer over a `Linear4bit`,

    W      = the original float weight, read from the model's safetensors file(s)
    Q      = the layer's NF4 / FP4 weight, dequantised (what the layer computes with)
    B, A   = the best rank-r fit of W - Q (loftq.rank_r_fit: B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T)

so that Q + B A is closer to W than Q alone (B A is W - Q itself, not divided by the LoRA scaling, as in HF
PEFT).

The weights are read one tensor at a time (safetensors is memory-mapped), so the full-precision model is never
held in memory. A `callback(model, module_name) -> bool` is called after each layer is replaced; False
restores that layer's previous factors (a greedy check, e.g. "did the logits get closer to the float
model's?").
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from torch import nn

from ....checkpoint import validate
from ....errors import AdapterFileNotFoundError
from ....quant.bnb import bnb_kind, dequantize_weight
from ..layer import LoraLayer
from .loftq import rank_r_fit

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------- reading W
def _local_snapshot(name_or_path: str) -> str:
    """The folder of `name_or_path`: a local folder as it is, else the Hub cache's snapshot (never
    downloaded)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    try:
        return snapshot_download(name_or_path, local_files_only=True)
    except Exception as err:  # invalid repo id, not in the cache
        raise ValueError(
            f"replace_lora_weights_loftq could not find the original weights of '{name_or_path}' on disk (no "
            "such folder, not in the Hugging Face cache). Pass model_path= pointing to the folder (or the "
            f"file) holding the model's {WEIGHTS_FILE}."
        ) from err


def _base_folder_or_file(peft_model, model_path: str | None) -> str:
    if model_path is not None:
        return str(model_path)
    config = getattr(peft_model.get_base_model(), "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    if not name:
        raise ValueError(
            "replace_lora_weights_loftq needs the original (unquantised) weights: this base model does not "
            "say where it was loaded from. Pass model_path= pointing to the folder (or the file) "
            f"holding {WEIGHTS_FILE}."
        )
    return _local_snapshot(str(name))


class OriginalWeights:
    """Reads single tensors from a model's safetensors file, or from its shards through the index file."""

    def __init__(self, location: str, base_model_prefix: str | None) -> None:
        path = location if location.endswith(WEIGHTS_FILE) else os.path.join(location, WEIGHTS_FILE)
        self.prefix = base_model_prefix
        self.files: dict[str, str] | None = None  # tensor name -> shard file; None: a single file
        self.path = path
        self.checked: set[str] = set()  # files whose safetensors header passed validate.safetensors_header
        if not os.path.isfile(path):
            self.files = self._shards(os.path.dirname(path))

    @staticmethod
    def _shards(folder: str) -> dict[str, str]:
        index = os.path.join(folder, INDEX_FILE)
        if not os.path.isfile(index):
            raise AdapterFileNotFoundError(
                "replace_lora_weights_loftq needs the original weights as safetensors: neither "
                f"{WEIGHTS_FILE} nor {INDEX_FILE} (shards) is in '{folder}'. Save the model with "
                "save_pretrained (safe_serialization) and pass that folder as model_path= (PyTorch .bin "
                "files cannot be read one tensor at a time)."
            )
        weight_map = validate.read_config_json(index).get("weight_map", {})
        # shard names come from the file: each must stay inside the folder (no '..', no symlink out of it)
        return {key: validate.check_contained(folder, os.path.join(folder, str(shard)))
                for key, shard in weight_map.items()}

    def _candidates(self, key: str) -> list[str]:
        """`key`, then without the model class's prefix (a LlamaModel file read for a LlamaForCausalLM,
        ...)."""
        keys = [key]
        if self.prefix and key.startswith(self.prefix + "."):
            keys.append(key[len(self.prefix) + 1:])
        return keys

    def get(self, key: str) -> torch.Tensor:
        for candidate in self._candidates(key):
            path = self.path if self.files is None else self.files.get(candidate)
            if path is None:
                continue
            # forged / truncated headers refused before safetensors maps the file
            if path not in self.checked:
                validate.safetensors_header(path)
                self.checked.add(path)
            with safe_open(path, framework="pt", device="cpu") as handle:
                if candidate in handle.keys():
                    return handle.get_tensor(candidate)
        where = self.path if self.files is None else f"the shards listed in {INDEX_FILE}"
        raise KeyError(
            f"replace_lora_weights_loftq: no tensor {' or '.join(repr(k) for k in self._candidates(key))} in "
            f"{where}. model_path must hold the weights of the same model the quantised base was loaded from."
        )


# ---------------------------------------------------------------------------------------------- the layers
def _four_bit_layers(peft_model, adapter_name: str) -> list[tuple[str, LoraLayer]]:
    """(module name inside the base model, LoRA layer) for each LoRA layer of `adapter_name` over a 4-bit
    layer."""
    found = []
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and bnb_kind(module.get_base_layer()) == "4bit":
            if adapter_name in module.r:
                found.append((name, module))
    return found


def _check_model(peft_model, adapter_name: str) -> list[tuple[str, LoraLayer]]:
    if not hasattr(peft_model, "get_base_model"):
        raise TypeError(
            "replace_lora_weights_loftq expects a PeftModel (from get_peft_model), got "
            f"{type(peft_model).__name__}."
        )
    known = getattr(peft_model, "peft_config", {})
    if adapter_name not in known:
        raise ValueError(
            f"replace_lora_weights_loftq: no adapter '{adapter_name}'; this model has {sorted(known)}.")
    layers = _four_bit_layers(peft_model, adapter_name)
    if not layers:
        raise ValueError(
            f"replace_lora_weights_loftq found no LoRA layer of adapter '{adapter_name}' over a bitsandbytes "
            "4-bit Linear4bit. Load the base model with BitsAndBytesConfig(load_in_4bit=True) and target its "
            "linear layers with LoRA (8-bit Linear8bitLt bases are not supported, as in HF PEFT)."
        )
    return layers


@torch.no_grad()
def loftq_factors(layer: LoraLayer, name: str, original: torch.Tensor,
                  key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one LoftQ round over the layer's 4-bit weight, in float32 on the weight's device."""
    quantised = dequantize_weight(layer.get_base_layer())
    if tuple(original.shape) != tuple(quantised.shape):
        raise ValueError(
            f"replace_lora_weights_loftq: '{key}' has shape {tuple(original.shape)} in the weights file but "
            f"the quantised layer is {tuple(quantised.shape)}: model_path holds another model."
        )
    rank, module_name = layer.r[name], key.removesuffix(".weight")
    if rank > min(quantised.shape):
        raise ValueError(
            f"replace_lora_weights_loftq: adapter '{name}' has r={rank} on '{module_name}', above min(out, "
            f"in) = {min(quantised.shape)}; a rank-r fit needs r <= min(out, in). Lower r for this "
            "layer (rank_pattern)."
        )
    residual = original.to(device=quantised.device, dtype=torch.float32) - quantised.float()
    left, right = rank_r_fit(residual, rank)
    return right, left


def _swap(layer: LoraLayer, name: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Put factors a, b (kept in each factor's dtype and device) into the layer; returns the previous ones."""
    weight_a, weight_b = layer.lora_weights(name)
    before = (weight_a.data, weight_b.data)
    weight_a.data = a.to(device=weight_a.device, dtype=weight_a.dtype)
    weight_b.data = b.to(device=weight_b.device, dtype=weight_b.dtype)
    return before


@torch.no_grad()
def replace_lora_weights_loftq(
    peft_model: nn.Module,
    model_path: str | None = None,
    adapter_name: str = "default",
    callback: Callable[[nn.Module, str], bool] | None = None,
) -> None:
    """Re-initialise the LoRA factors of `adapter_name` on every 4-bit (bitsandbytes Linear4bit) layer with
    one LoftQ step against the original weights (see the module doc).

    model_path: folder (or model.safetensors file, or a folder of shards with model.safetensors.index.json) of
    the unquantised model; default: where the base model was loaded from (a local folder or the Hugging Face
    cache). callback(model, module_name) -> bool: called after each layer; False puts that layer's previous
    factors back.
    """
    layers = _check_model(peft_model, adapter_name)
    base = peft_model.get_base_model()
    weights = OriginalWeights(_base_folder_or_file(peft_model, model_path),
                              getattr(base, "base_model_prefix", None))
    for module_name, layer in layers:
        key = f"{module_name}.weight"
        a, b = loftq_factors(layer, adapter_name, weights.get(key), key)
        before = _swap(layer, adapter_name, a, b)
        if callback is not None and not callback(peft_model, module_name):
            _swap(layer, adapter_name, *before)
