"""Checks on adapter files that may come from anyone (a Hub repo, a colleague's folder).

Everything here runs before a tensor is built or memory is allocated: the safetensors header is parsed and
checked against the file's real size, the config's values are checked against their declared types and sane
size bounds, and every path a load or a save uses must stay inside the folder it was given. Failures raise
`UnsafeAdapterFileError` (a file or path that must not be trusted), `AdapterLoadError` (a corrupt weights
file) or `AdapterConfigError` (a config that makes no sense), all `FastPeftError`s.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import AdapterConfigError, AdapterLoadError, FastPeftError, UnsafeAdapterFileError

# safetensors' own reader refuses headers above 100 MB; an adapter header is a few KB
MAX_HEADER_BYTES = 100_000_000
# an adapter_config.json is a few KB (a large rank_pattern: tens of KB)
MAX_CONFIG_BYTES = 16 * 1024 * 1024

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "C64": 8, "I64": 8, "U64": 8, "F64": 8,
}

# packages AutoPeftModel may import when a config's auto_mapping names the base model class (as HF PEFT)
DEFAULT_IMPORT_ALLOWLIST = ("diffusers", "lerobot", "megatron-core", "transformers")

# errors a malformed file can trigger while a config is built or an adapter injected; wrapped by file_errors()
_WRAPPED = (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, ZeroDivisionError,
            RuntimeError, RecursionError)


# ---------------------------------------------------------------------------------------------------- paths
def check_subfolder(subfolder: Any) -> None:
    """A `subfolder` argument must be a relative path that stays inside the adapter folder."""
    if subfolder in (None, ""):
        return
    if not isinstance(subfolder, str):
        raise UnsafeAdapterFileError(f"subfolder must be a string, got {type(subfolder).__name__}.")
    parts = Path(subfolder.replace("\\", "/")).parts
    if os.path.isabs(subfolder) or subfolder.startswith(("/", "\\")) or ".." in parts or ":" in subfolder:
        raise UnsafeAdapterFileError(
            f"subfolder={subfolder!r} leaves the adapter folder; pass a relative sub-folder name without "
            "'..', a drive or a leading '/'."
        )


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _hub_cache_blobs(folder: str) -> str | None:
    """The `blobs` folder of a huggingface_hub cache when `folder` is one of its snapshots (files link
    there)."""
    parent = os.path.dirname(folder)
    if os.path.basename(parent) != "snapshots":
        return None
    return os.path.join(os.path.dirname(parent), "blobs")


def check_contained(folder: str | os.PathLike, path: str | os.PathLike) -> str:
    """`path` (in local adapter folder `folder`) must really lie inside it: a symlink to elsewhere is refused.

    Links of a huggingface_hub cache snapshot into its own `blobs` folder are the one allowed exception.
    """
    root = os.path.realpath(folder)
    real = os.path.realpath(path)
    blobs = _hub_cache_blobs(root)
    if _inside(real, root) or (blobs is not None and _inside(real, os.path.realpath(blobs))):
        return str(path)
    raise UnsafeAdapterFileError(
        f"{path} resolves to {real}, outside the adapter folder {root} (a symlink or '..' path): refusing to "
        "read it. Copy the real file into the adapter folder if you trust it."
    )


def check_write_target(save_directory: str | os.PathLike, path: str | os.PathLike) -> None:
    """Refuse to save through a folder symlink that leads out of `save_directory`.

    A symlinked *file* is safe: writes go to a temp file that then replaces the link itself, not its target.
    """
    root = os.path.realpath(save_directory)
    parent = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    if not _inside(parent, root):
        raise UnsafeAdapterFileError(
            f"Saving {path} would write into {parent}, outside save_directory {root} (a symlinked "
            "sub-folder). Remove the symlink or save somewhere else."
        )


# ------------------------------------------------------------------------------------------------ safetensors
def safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and check a safetensors file's header without reading its tensors; returns the header dict."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise AdapterLoadError(
                f"{path} is truncated ({size} bytes): not a safetensors file. Save it again.")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise UnsafeAdapterFileError(
                f"{path}: the safetensors header claims {length} bytes but the file has {size}: the file is "
                "truncated or forged. Download or save it again."
            )
        raw = fh.read(length)
    header = _parse_header(raw, path)
    _check_entries(header, size - 8 - length, path)
    return header


def _parse_header(raw: bytes, path) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise AdapterLoadError(
            f"{path}: the safetensors header is not valid JSON ({err}); the file is corrupt.") from err
    if not isinstance(header, dict):
        raise AdapterLoadError(f"{path}: the safetensors header is not a JSON object; the file is corrupt.")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise AdapterLoadError(f"{path}: the safetensors __metadata__ must map strings to strings.")
    return header


def _check_entries(header: dict[str, Any], data_bytes: int, path) -> None:
    spans = sorted(_entry_span(key, entry, path) for key, entry in header.items() if key != "__metadata__")
    end = 0
    for begin, stop, key in spans:
        if begin != end:
            raise UnsafeAdapterFileError(f"{path}: tensor '{key}' overlaps another or leaves a gap in the "
                                         "data; the file is corrupt or forged.")
        end = stop
    if end > data_bytes:
        raise UnsafeAdapterFileError(
            f"{path}: the header declares {end} bytes of tensor data but the file holds {data_bytes}: the "
            "file is truncated or forged. Download or save it again."
        )


def _entry_span(key: str, entry: Any, path) -> tuple[int, int, str]:
    if not isinstance(entry, dict):
        raise AdapterLoadError(f"{path}: header entry '{key}' is not an object; the file is corrupt.")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise AdapterLoadError(f"{path}: tensor '{key}' has unknown dtype {dtype!r}; expected one of "
                               f"{sorted(DTYPE_BYTES)}.")
    if not _int_list(shape) or not _int_list(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise AdapterLoadError(f"{path}: tensor '{key}' has a malformed shape {shape!r} or data_offsets "
                               f"{offsets!r}; the file is corrupt.")
    if math.prod(shape) * DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
        raise UnsafeAdapterFileError(f"{path}: tensor '{key}' of shape {shape} ({dtype}) does not match its "
                                     f"{offsets[1] - offsets[0]} data bytes; the file is corrupt or forged.")
    return offsets[0], offsets[1], key


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def load_safetensors(path: str, device: str = "cpu"):
    """`safetensors.torch.load_file` after the header checks; its own errors become AdapterLoadError."""
    from safetensors import torch as safe_torch

    safetensors_header(path)
    try:
        return safe_torch.load_file(path, device=device)
    except Exception as err:  # safetensors' Rust errors share no useful base class
        raise AdapterLoadError(
            f"{path} could not be read as safetensors: {err}. Save or download it again.") from err


# ---------------------------------------------------------------------------------------------------- configs
def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read an adapter_config.json: bounded size, valid UTF-8 JSON holding an object."""
    size = os.path.getsize(path)
    if size > MAX_CONFIG_BYTES:
        raise UnsafeAdapterFileError(
            f"{path} is {size} bytes; an adapter config is a few KB. Refusing to parse it.")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise AdapterConfigError(
            f"{path} is not valid JSON ({err}); it is not a readable adapter config.") from err
    if not isinstance(data, dict):
        raise AdapterConfigError(f"{path} does not hold a JSON object; it is not an adapter config.")
    return data


@contextmanager
def file_errors(source: Any, what: str = "adapter config") -> Iterator[None]:
    """Re-raise errors a bad file triggers (TypeError, ValueError, ...) as AdapterConfigError naming
    `source`."""
    try:
        yield
    except FastPeftError:
        raise
    except _WRAPPED as err:
        raise AdapterConfigError(f"The {what} from {source} is invalid: {type(err).__name__}: {err}") from err


def check_import_allowlist(module_name: Any, allowlist: tuple[str, ...] | list[str] | None = None) -> None:
    """A config's auto_mapping may only import packages in `allowlist` (or their sub-modules)."""
    allowed = DEFAULT_IMPORT_ALLOWLIST if allowlist is None else tuple(allowlist)
    if isinstance(module_name, str) and any(module_name == a or module_name.startswith(f"{a}.")
                                            for a in allowed):
        return
    raise UnsafeAdapterFileError(
        f"The adapter config's auto_mapping wants to import {module_name!r}, which is not in the import "
        f"allowlist {list(allowed)}. If you trust that package, pass "
        f"import_allowlist=[{module_name!r}] to from_pretrained."
    )
