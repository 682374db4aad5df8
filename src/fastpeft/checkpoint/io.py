"""Adapter files on disk and on the Hub: locating, reading and atomically writing them.

Only `safetensors` and `torch.load(weights_only=True)` are used to read weights: no pickle code runs.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import torch as safe_torch

from ..errors import (
    AdapterFileNotFoundError,  # noqa: F401  (re-exported: io.AdapterFileNotFoundError)
    AdapterLoadError,
    UnsafeAdapterFileError,
)
from . import atomic, validate

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"

# keyword arguments that belong to huggingface_hub downloads, not to the adapter
HUB_KWARGS = ("revision", "cache_dir", "force_download", "proxies", "token", "local_files_only", "subfolder")


def split_hub_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split `kwargs` into (huggingface_hub download kwargs, the rest)."""
    hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    rest = {k: v for k, v in kwargs.items() if k not in HUB_KWARGS}
    return hub, rest


def resolve_file(model_id: str | os.PathLike, filename: str, **hub_kwargs: Any) -> str | None:
    """Path to `filename` in a local adapter folder or a Hub repo (cached copy when offline); None if
    absent."""
    subfolder = hub_kwargs.pop("subfolder", None) or ""
    validate.check_subfolder(subfolder)
    local = Path(model_id) / subfolder / filename
    if Path(model_id).is_dir():
        # a save killed while publishing: its files
        local = atomic.pending_file(local.parent, filename) or local
        # a local folder's files must not be symlinks (or '..' paths) to files outside it
        return validate.check_contained(model_id, local) if local.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    hub_kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    try:
        return hf_hub_download(str(model_id), filename, subfolder=subfolder or None, **hub_kwargs)
    except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError) as err:
        logger.debug("%s not found for %s: %s", filename, model_id, err)
        return None
    except ValueError as err:  # malformed repo id: treat as "no such adapter" and report below
        logger.debug("could not resolve %s for %s: %s", filename, model_id, err)
        return None


def where(model_id: str | os.PathLike, subfolder: str | None) -> str:
    """Human-readable location used in error messages."""
    return f"{model_id}/{subfolder}" if subfolder else str(model_id)


def atomic_write_many(jobs: list[tuple[str | os.PathLike, Callable[[str], None]]]) -> None:
    """Write `(path, writer)` jobs so that a crash or kill at any moment leaves each folder's old or new
    files.

    The files of one folder are staged, fsynced and committed with one rename (checkpoint/atomic.py explains
    the scheme and how a save killed mid-way is finished by readers and the next save).
    """
    atomic.write_files(jobs)


def text_writer(text: str) -> Callable[[str], None]:
    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return _write


def json_writer(data: dict[str, Any]) -> Callable[[str], None]:
    return text_writer(json.dumps(data, indent=2, sort_keys=True))


def weights_writer(tensors: dict[str, torch.Tensor], safe: bool = True,
                   metadata: dict[str, str] | None = None) -> Callable[[str], None]:
    """A writer for `atomic_write_many`: safetensors (default; `metadata` joins its header) or a torch
    `.bin`."""
    # safetensors refuses tensors sharing storage, and torch.save writes a view's whole storage (LoRA factors
    # are slices of stacks after mixed-batch serving, methods/lora/stacked.py): those get their own copy
    ptrs = Counter(v.untyped_storage().data_ptr() for v in tensors.values())
    tensors = {k: _own_copy(v) if ptrs[v.untyped_storage().data_ptr()] > 1
               or v.untyped_storage().nbytes() > v.numel() * v.element_size() else v.detach().contiguous()
               for k, v in tensors.items()}
    if safe:
        # looked up at call time (not imported by name) so tests can simulate a crash mid-write
        header = {**(metadata or {}), "format": "pt"}
        return lambda tmp: safe_torch.save_file(tensors, tmp, metadata=header)
    return lambda tmp: torch.save(tensors, tmp)


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    atomic_write_many([(path, json_writer(data))])


def _own_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().clone()


def load_weights_file(path: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a `.safetensors` or legacy `.bin` adapter file without executing pickled code."""
    if path.endswith(".safetensors"):
        # header checked against the file size first
        return validate.load_safetensors(path, device=str(device))
    try:
        tensors = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only unpickler refuses anything but tensors and containers
        raise UnsafeAdapterFileError(
            f"{path} holds pickled objects other than tensors, refused by torch.load(weights_only=True): "
            f"{err}. fastpeft never unpickles arbitrary objects "
            "(that could run code); re-save the adapter as safetensors with a trusted tool."
        ) from err
    except Exception as err:  # truncated, or not a torch file at all
        raise AdapterLoadError(
            f"{path} could not be read with torch.load(weights_only=True): {err}.") from err
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise AdapterLoadError(f"{path} does not hold a dict of tensors; it is not an adapter weights file.")
    return tensors


def load_peft_weights(model_id: str, device: str | None = None, key_mapping: dict[str, str] | None = None,
                      **hub_kwargs: Any) -> dict[str, torch.Tensor]:
    """Load the adapter weights (as saved, adapter names stripped) from a folder or Hub repo id.

    `key_mapping` ({regex: replacement}) renames keys saved for an older layout of the base model; see
    `remap_file_keys`.
    """
    weights = _read_peft_weights(model_id, device, **hub_kwargs)
    return remap_file_keys(weights, key_mapping) if key_mapping else weights


# what every adapter-layer key in a file starts with (PeftModel / tuner wrappers); key_mapping applies after
# it
_WRAPPER_PREFIXES = ("base_model.model.", "base_model.")


def remap_file_keys(weights: dict[str, torch.Tensor], key_mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    """Keys renamed by `key_mapping` as HF PEFT does: the wrapper prefix is set aside, the first pattern (in
    order) that matches is applied with `re.subn`, then the prefix is put back. transformers uses the same
    patterns (a model's `_checkpoint_conversion_mapping`) for base checkpoints saved before a layout
    change."""
    renamed = {}
    for key, value in weights.items():
        prefix = next((p for p in _WRAPPER_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise AdapterLoadError(
                f"key_mapping cannot be applied to the file key {key!r}: it does not start with "
                f"{' or '.join(map(repr, _WRAPPER_PREFIXES))}. key_mapping renames the keys of adapter files "
                "written by save_pretrained; load other files without it."
            )
        renamed[prefix + remap_key(key[len(prefix):], key_mapping)] = value
    if len(renamed) != len(weights):
        raise AdapterLoadError(
            f"key_mapping {key_mapping!r} maps several file keys to one name; nothing loaded.")
    return renamed


def remap_key(key: str, key_mapping: dict[str, str]) -> str:
    """`key` (no wrapper prefix) renamed by the first pattern of `key_mapping` that matches it."""
    for pattern, replacement in key_mapping.items():
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    return key


def _read_peft_weights(model_id: str, device: str | None = None,
                       **hub_kwargs: Any) -> dict[str, torch.Tensor]:
    hub_kwargs, _ = split_hub_kwargs(hub_kwargs)
    subfolder = hub_kwargs.get("subfolder")
    path = resolve_file(model_id, SAFETENSORS_WEIGHTS_NAME, **dict(hub_kwargs))
    if path is None:
        path = resolve_file(model_id, WEIGHTS_NAME, **dict(hub_kwargs))
    if path is None:
        raise AdapterFileNotFoundError(
            f"No {SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME} found at '{where(model_id, subfolder)}'. "
            "Pass the folder that save_pretrained wrote (or a Hub repo id that holds an adapter)."
        )
    return load_weights_file(path, device or "cpu")
