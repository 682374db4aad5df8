"""Import AdapterHub (`adapters` library) bottleneck adapter folders as fastpeft BOTTLENECK adapters.

An AdapterHub folder holds `adapter_config.json` ({"config": BnConfig fields, "model_type", "hidden_size",
"name", ...}) and `pytorch_adapter.bin` or `adapter.safetensors`, whose keys are
`<output block path>.adapters.<name>.<tensor>` (e.g. `bert.encoder.layer.0.output.adapters.h.adapter_up.
weight`). The config becomes a `BottleneckConfig` (unsupported options refused), the keys are mapped to the
model's output blocks by (location, layer index) through the architecture table, and the result is loaded
as a fastpeft adapter folder would be (strict, all or nothing: a refused import leaves the model unchanged).
Prediction heads and AdapterFusion layers stored beside the adapter are not imported.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile

import torch

from ...checkpoint import io, validate
from ...errors import AdapterConfigError, AdapterFileNotFoundError, AdapterLoadError
from .architectures import Architecture, architecture_for, locate
from .config import PRESET_ALIASES, PRESETS, BottleneckConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter.safetensors", "pytorch_adapter.bin")
HEAD_FILES = ("pytorch_model_head.bin", "model_head.safetensors")
FUSION_FILE = "adapter_fusion_config.json"
# keys of an AdapterHub BnConfig dict that are not BottleneckConfig fields but are accepted when empty
_EMPTY_OK = {"architecture": None, "invertible_adapter": None}
_KEY = re.compile(r"(?P<block>.+)\.adapters\.(?P<name>[^.]+)\.(?P<rest>.+)")
_NORM_BEFORE = "adapter_norm_before."


def _bn_fields() -> set[str]:
    from dataclasses import fields

    from ...config import PeftConfig

    return {f.name for f in fields(BottleneckConfig)} - {f.name for f in fields(PeftConfig)} - {
        "modules_to_save"}


def read_adapterhub_config(path_or_config) -> dict:
    """The whole `adapter_config.json` of a folder, or the dict given."""
    if isinstance(path_or_config, dict):
        return dict(path_or_config)
    folder = os.fspath(path_or_config)
    file = os.path.join(folder, CONFIG_FILE) if os.path.isdir(folder) else folder
    if not os.path.isfile(file):
        raise AdapterFileNotFoundError(
            f"No AdapterHub adapter config at {file}: pass a local folder saved by the adapters library's "
            "save_adapter (download Hub adapters first, e.g. huggingface_hub.snapshot_download).")
    return validate.read_config_json(file)


def config_from_adapterhub(path_or_config, **overrides) -> BottleneckConfig:
    """A `BottleneckConfig` from an AdapterHub config (folder, whole file dict or its "config" entry)."""
    data = read_adapterhub_config(path_or_config)
    bn = data.get("config", data) if isinstance(data.get("config", data), (dict, str)) else None
    if isinstance(bn, str):  # an AdapterHub preset name ("pfeiffer", "seq_bn", ...)
        if PRESET_ALIASES.get(bn, bn) not in PRESETS:
            raise NotImplementedError(f"AdapterHub config {bn!r} is not a bottleneck preset fastpeft knows "
                                      f"({sorted(PRESETS) + sorted(PRESET_ALIASES)}).")
        return BottleneckConfig.preset(bn, **overrides)
    if bn is None:
        raise AdapterConfigError(f"AdapterHub config {data!r} has no 'config' object.")
    architecture = bn.get("architecture")
    if architecture is not None:
        raise NotImplementedError(
            f"This AdapterHub adapter is a {architecture!r} adapter; fastpeft imports bottleneck adapters "
            "only (architecture None: Houlsby / Pfeiffer / parallel and their variants). LoRA, prefix "
            "tuning, prompt tuning, ReFT and ConfigUnion adapters are not imported.")
    known = _bn_fields()
    unknown = sorted(k for k in bn if k not in known and _EMPTY_OK.get(k, object()) != bn[k])
    if unknown:
        raise NotImplementedError(
            f"AdapterHub config options {unknown} are not supported by fastpeft's bottleneck adapters (they "
            "would change the adapter's computation); the adapter is not imported.")
    return BottleneckConfig(**{k: v for k, v in bn.items() if k in known}, **overrides)


def _weights(folder: str) -> dict[str, torch.Tensor]:
    if os.path.isfile(os.path.join(folder, FUSION_FILE)):
        raise NotImplementedError(
            f"{folder} holds an AdapterFusion layer ({FUSION_FILE}): fusion is not supported by fastpeft; "
            "import the fused adapters one by one and activate one (or a stack) at a time.")
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            validate.check_contained(folder, path)
            return io.load_weights_file(path)
    raise AdapterFileNotFoundError(f"{folder} has none of the AdapterHub weight files {list(WEIGHT_FILES)}.")


def _check_model(data: dict, arch: Architecture, base) -> None:
    file_type = data.get("model_type")
    if file_type is not None and file_type not in arch.model_types:
        raise NotImplementedError(
            f"The AdapterHub adapter was trained on a {file_type!r} model, but the model is "
            f"{arch.model_types[0]!r}; load it onto the model type it was made for.")
    hidden = getattr(getattr(base, "config", None), "hidden_size", None)
    if data.get("hidden_size") is not None and hidden is not None and data["hidden_size"] != hidden:
        raise AdapterLoadError(f"The AdapterHub adapter was trained with hidden_size="
                               f"{data['hidden_size']}, the model has {hidden}.")


def convert_state_dict(weights: dict[str, torch.Tensor], base, arch: Architecture) -> dict[str, torch.Tensor]:
    """AdapterHub keys -> fastpeft file keys (`base_model.model.<block>.bottleneck_adapter.<tensor>`)."""
    blocks = {}
    for name, _ in base.named_modules():
        place = locate(arch, name)
        if place is not None and ".base_layer" not in name:
            blocks.setdefault(place, name)
    converted, unknown, names = {}, [], set()
    for key, tensor in weights.items():
        match = _KEY.fullmatch(key)
        place = locate(arch, match.group("block")) if match else None
        if place is None or place not in blocks:
            unknown.append(key)
            continue
        names.add(match.group("name"))
        rest = match.group("rest")
        if rest.startswith(_NORM_BEFORE):
            # with ln_before the adapters library registers its first LayerNorm twice (also as
            # adapter_down.0): keep the adapter_down.0 copy, which must be the same tensor
            twin = key.replace(_NORM_BEFORE, "adapter_down.0.")
            if twin not in weights or not torch.equal(weights[twin], tensor):
                raise AdapterLoadError(f"{key} differs from {twin}: the file is inconsistent.")
            continue
        converted[f"base_model.model.{blocks[place]}.bottleneck_adapter.{rest}"] = tensor
    if unknown:
        raise NotImplementedError(
            f"AdapterHub tensors {sorted(unknown)[:6]} ({len(unknown)} in all) do not belong to a bottleneck "
            "adapter in an output block of this model (invertible adapters, other methods, other layouts are "
            "not imported); the adapter is not imported.")
    if len(names) > 1:
        raise AdapterLoadError(f"The AdapterHub weights hold several adapters {sorted(names)}; save one per "
                               "folder.")
    return converted


def load_adapterhub_adapter(model, path: str | os.PathLike, adapter_name: str | None = None,
                            is_trainable: bool = False):
    """Load the AdapterHub bottleneck adapter saved in folder `path` onto `model`.

    `model`: a transformers model (returns a new `PeftModel` around it) or a `PeftModel` holding bottleneck
    adapters (the adapter is added to it, which is returned). `adapter_name` defaults to the name stored in
    the folder. The outputs equal the adapters library's for that adapter; the adapter is then saved with
    `save_pretrained` in fastpeft's format (peft_type "BOTTLENECK"). Refused with the model unchanged: another
    architecture than the table's (architectures.py), other adapter methods, unsupported options.
    """
    from ...peft_model import PeftModel

    folder = os.fspath(path)
    data = read_adapterhub_config(folder)
    config = config_from_adapterhub(data)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    arch = architecture_for(base)
    _check_model(data, arch, base)
    converted = convert_state_dict(_weights(folder), base, arch)
    name = adapter_name or data.get("name") or "default"
    if isinstance(model, PeftModel) and name in model.peft_config:
        raise ValueError(f"The model already has an adapter named {name!r}; pass another adapter_name=.")
    if any(os.path.isfile(os.path.join(folder, f)) for f in HEAD_FILES):
        logger.info("%s holds an AdapterHub prediction head; heads are not imported (only the adapter).",
                    folder)
    config.inference_mode = not is_trainable
    config.base_model_name_or_path = data.get("model_name") or None
    with tempfile.TemporaryDirectory(prefix="fastpeft-adapterhub-") as tmp:
        config.save_pretrained(tmp)
        io.weights_writer(converted)(os.path.join(tmp, "adapter_model.safetensors"))
        if isinstance(model, PeftModel):
            model.load_adapter(tmp, name, is_trainable=is_trainable, strict=True)
            return model
        return PeftModel.from_pretrained(model, tmp, name, is_trainable=is_trainable, strict=True)
