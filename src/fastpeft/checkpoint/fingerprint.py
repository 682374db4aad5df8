"""Base-model fingerprint: does the model an adapter is loaded onto have the weights it was trained on?

A fastpeft extension (HF PEFT has none). On save, each module the adapter targets gets a small entry: its base
weight's shape and dtype and three float64 sums over 64 evenly strided elements (plain, absolute, alternating
sign). Reading 64 elements per module keeps this cheap for any model size. The entries go, as one JSON string,
into the safetensors header's `__metadata__` under `fastpeft_base_fingerprint`: HF PEFT never reads that
metadata, so its loading is unaffected and silent (a key in adapter_config.json would make HF PEFT warn that
the file needs a newer PEFT, and would add a field HF PEFT's configs do not have).

On load the same sums are taken from the new base. They must match to 4 eps of the coarser dtype (relative to
the absolute sum): exact copies, casts (an fp32 training base, a bf16 inference base) and merge + unmerge
cycles pass, other weights do not. A module that differs is reported in a warning, or raises
`AdapterLoadError` with `strict=True`.

No fingerprint is written where the base weights at save time are not the ones the adapter must be loaded
onto: merged layers (their weight holds the adapter), adapters whose init rewrites the base (PiSSA, OLoRA,
CorDA, LoRA-GA, LoftQ: loading re-runs the init on the original base), PiSSA-style conversions to the original
base, layer_replication (its modules only exist after injection), quantised, sharded or meta weights, prompt
methods. Files without the key (HF PEFT's, `.bin` files) are not checked.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import AdapterLoadError
from . import io, validate

logger = logging.getLogger(__name__)

METADATA_KEY = "fastpeft_base_fingerprint"
VERSION = 1
SAMPLES = 64
MAX_MODULES = 512  # larger adapters fingerprint an evenly spread subset of their modules
ROUNDING_EPS = 4
STATS = ("sum", "abs", "alt")
# file keys of a base weight an adapter file carries: <FILE_PREFIX><module in the user's model><BASE_WEIGHT>
FILE_PREFIX, BASE_WEIGHT = "base_model.model.", ".base_layer.weight"


# ------------------------------------------------------------------------------------------------- one module
def base_tensor(module: nn.Module) -> torch.Tensor | None:
    """The weight a (possibly adapter-wrapped) module's base layer computes with."""
    module = _innermost(module)
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    return next(iter(module.parameters(recurse=False)), None)


def _innermost(module: nn.Module) -> nn.Module:
    for _ in range(64):  # adapter layers wrap each other a few levels deep at most
        get = getattr(module, "get_base_layer", None)
        inner = get() if callable(get) else module
        if inner is module:
            break
        module = inner
    return module


def _hashable(weight: Any) -> bool:
    return (type(weight) in (torch.Tensor, nn.Parameter) and weight.is_floating_point() and not weight.is_meta
            and weight.numel() > 0 and not hasattr(weight, "ds_shape"))  # ds_shape: a DeepSpeed ZeRO-3 shard


def module_entry(module: nn.Module) -> dict[str, Any] | None:
    """Shape, dtype and strided-sample sums of `module`'s base weight; None where it cannot be sampled."""
    return module_entries([module])[0]


def module_entries(modules: list[nn.Module | None]) -> list[dict[str, Any] | None]:
    """`module_entry` of each module (None for a None module), batched: one gather per weight and one host
    copy per device, so a save or load pays a few microseconds per targeted module."""
    weights = [None if m is None else base_tensor(m) for m in modules]
    by_device: dict[torch.device, list[int]] = {}
    for i, weight in enumerate(weights):
        if _hashable(weight):
            by_device.setdefault(weight.device, []).append(i)
    samples: dict[int, tuple[list[float], list[float]]] = {}
    with torch.no_grad():
        for device, rows in by_device.items():
            picked = [torch.take(weights[i], _sample_index(weights[i].numel(), device)) for i in rows]
            host = torch.cat(picked).to(torch.float64).cpu()  # cat widens mixed float dtypes: exact
            # the same values with every second one of each weight negated (exact), for the "alt" sum
            flat, signed = host.tolist(), (host * torch.cat([_signs(p.numel()) for p in picked])).tolist()
            start = 0
            for i, p in zip(rows, picked):
                samples[i] = flat[start:start + p.numel()], signed[start:start + p.numel()]
                start += p.numel()
    return [_entry(weights[i], *samples[i]) if i in samples else None for i in range(len(modules))]


@functools.lru_cache(maxsize=SAMPLES)
def _signs(count: int) -> torch.Tensor:
    """+1, -1, +1, ... (`count` of them, float64 on the host)."""
    return 1.0 - 2.0 * (torch.arange(count, dtype=torch.float64) % 2)


@functools.lru_cache(maxsize=256)
def _sample_index(numel: int, device: torch.device) -> torch.Tensor:
    """Flat (row-major) indices of the SAMPLES evenly strided elements of a tensor with `numel` elements."""
    count = min(SAMPLES, numel)
    return torch.arange(count, device=device) * numel // count


def _entry(weight: torch.Tensor, values: list[float], signed: list[float]) -> dict[str, Any]:
    return {
        "shape": list(weight.shape),
        "dtype": str(weight.dtype).removeprefix("torch."),
        "sum": math.fsum(values),
        "abs": math.fsum(map(abs, values)),
        "alt": math.fsum(signed),  # `values` with alternating signs; fsum is exact
    }


def entry_difference(stored: dict[str, Any], current: dict[str, Any] | None) -> str | None:
    """Why `current` is not the module `stored` describes, or None when it matches (or cannot be judged)."""
    if current is None:
        return None
    if stored["shape"] != current["shape"]:
        return f"shape {current['shape']}, saved with {stored['shape']}"
    tol = _tolerance(stored["dtype"], current["dtype"]) * max(stored["abs"], current["abs"])
    if all(abs(stored[k] - current[k]) <= tol for k in STATS):
        return None
    return f"different weights (sampled sum {current['sum']:.6g}, saved with {stored['sum']:.6g})"


def _tolerance(dtype_a: str, dtype_b: str) -> float:
    """Relative to the absolute sum: a cast rounds each value by <= eps/2 of the coarser dtype, a
    merge + unmerge cycle by a few eps; 4 eps covers both, far below what other weights change (fp32: 5e-7,
    bf16: 3%)."""
    dtypes = [getattr(torch, d, None) for d in (dtype_a, dtype_b)]
    if not all(isinstance(d, torch.dtype) and d.is_floating_point for d in dtypes):
        return 1e-2
    return ROUNDING_EPS * max(torch.finfo(d).eps for d in dtypes)


# -------------------------------------------------------------------------------------------------- save side
Modules = list[tuple[str, nn.Module]]  # `peft_model.named_modules()`, when a save has walked it already


def targeted_modules(peft_model, adapter_name: str, modules: Modules | None = None) -> list[str]:
    """Names (in the user's model) of the unmerged layers holding `adapter_name`."""
    return [name for name, _ in targeted_layers(peft_model, adapter_name, modules)]


def targeted_layers(peft_model, adapter_name: str,
                    modules: Modules | None = None) -> list[tuple[str, nn.Module]]:
    """(name in the user's model, layer) of the unmerged layers holding `adapter_name`; `modules` (the
    PeftModel's `named_modules()`) spares a second walk over the model when the caller has one."""
    found = [(name, layer) for name, layer in _layers(peft_model, modules)
             if name and layer.has_adapter(adapter_name) and not layer.merged]
    if len(found) > MAX_MODULES:
        found = [found[i * len(found) // MAX_MODULES] for i in range(MAX_MODULES)]
    return found


def _layers(peft_model, modules: Modules | None) -> list[tuple[str, nn.Module]]:
    """(name under the base model, layer) of the tuner's adapter layers: from `modules` where the base model
    is among them, else the tuner's own walk; none for prompt methods."""
    from ..core.layer import AdapterLayer

    walk = getattr(peft_model.tuner, "holders", None)
    if walk is None:
        return []
    base = peft_model.tuner.model
    prefix = None if modules is None else next((name for name, m in modules if m is base), None)
    if prefix is None:
        return [(name, m) for name, m in walk() if isinstance(m, AdapterLayer)]
    start = prefix + "." if prefix else ""
    return [(name[len(start):], m) for name, m in modules
            if isinstance(m, AdapterLayer) and name.startswith(start)]


def compute(peft_model, adapter_name: str, modules: Modules | None = None,
            file_keys: Iterable[str] = ()) -> dict[str, Any] | None:
    """The fingerprint of the base under adapter `adapter_name`, or None where none applies (see module
    doc). Layers whose base weight the file itself carries (`file_keys`: embeddings saved for a resized
    vocabulary) are left out: a load writes those weights, so any base fits them."""
    if peft_model.peft_config[adapter_name].rewrites_base_weights:
        return None  # e.g. PiSSA: loading re-runs the init on the original base (see rewrites_base_weights)
    carried = {key[len(FILE_PREFIX):-len(BASE_WEIGHT)] for key in file_keys
               if key.startswith(FILE_PREFIX) and key.endswith(BASE_WEIGHT)}
    layers = [(name, layer) for name, layer in targeted_layers(peft_model, adapter_name, modules)
              if name not in carried]
    found = module_entries([layer for _, layer in layers])  # the layer at each name: no lookup by path again
    entries = {name: entry for (name, _), entry in zip(layers, found) if entry is not None}
    return {"version": VERSION, "modules": entries} if entries else None


def file_metadata(peft_model, adapter_name: str, converted: bool = False,
                  modules: Modules | None = None, file_keys: Iterable[str] = ()) -> dict[str, str]:
    """safetensors metadata holding the fingerprint (empty for converted adapters or where none applies)."""
    found = None if converted else compute(peft_model, adapter_name, modules, file_keys)
    return {} if found is None else {METADATA_KEY: json.dumps(found, separators=(",", ":"))}


# -------------------------------------------------------------------------------------------------- load side
def resolve_module(model: nn.Module, name: str) -> nn.Module | None:
    """`model.<name>`, stepping through adapter wrappers where a name part is not found; a `base_layer` part
    (a layer nested in another adapter layer) is skipped where the model has no wrapper there."""
    module = model
    for part in name.split("."):
        child = _child(module, part)
        if child is None and part == "base_layer":
            continue
        if child is None:
            return None
        module = child
    return module


def _child(module: nn.Module, part: str) -> nn.Module | None:
    for _ in range(64):
        child = module._modules.get(part)
        if child is not None:
            return child
        inner = _innermost(module)
        if inner is module:
            return None
        module = inner
    return None


def stored_fingerprint(model_id, **hub_kwargs: Any) -> dict[str, Any] | None:
    """The fingerprint saved in `model_id`'s safetensors header, None if absent or unreadable."""
    path = io.resolve_file(model_id, io.SAFETENSORS_WEIGHTS_NAME, **dict(hub_kwargs))
    if path is None:
        return None
    text = validate.safetensors_header(path).get("__metadata__", {}).get(METADATA_KEY)
    return None if text is None else parse(text, path)


def parse(text: str, source: Any) -> dict[str, Any] | None:
    """A stored fingerprint checked entry by entry; a malformed one is ignored with a warning (not
    trusted)."""
    try:
        data = json.loads(text)
        modules = data["modules"]
        if data.get("version") != VERSION or not all(_valid_entry(e) for e in modules.values()):
            raise ValueError("unexpected layout")
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as err:
        logger.warning("Ignoring the unreadable base-model fingerprint in %s (%s).", source, err)
        return None
    return data


def _valid_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("shape"), list) and all(type(s) is int for s in entry["shape"])
            and all(isinstance(entry.get(k), (int, float)) and not isinstance(entry.get(k), bool)
                    for k in STATS))


def differences(model: nn.Module, fingerprint: dict[str, Any]) -> dict[str, str]:
    """Module name -> how `model` differs from the fingerprinted base (empty when it matches)."""
    stored_entries = fingerprint["modules"]
    modules = [resolve_module(model, name) for name in stored_entries]
    found = {}
    for (name, stored), module, current in zip(stored_entries.items(), modules, module_entries(modules)):
        if getattr(module, "merged", False) is True:  # its weight holds another adapter now: no verdict
            continue
        why = "not in this model" if module is None else entry_difference(stored, current)
        if why is not None:
            found[name] = why
    return found


def check_fingerprint(model: nn.Module, model_id, adapter_name: str, strict: bool = False,
                      key_mapping: dict[str, str] | None = None, **hub_kwargs: Any) -> dict[str, str]:
    """Compare `model` (the user's base model, wrapped or not) with the fingerprint saved in `model_id`.

    A mismatch logs a warning naming the modules that differ, or raises AdapterLoadError when `strict` (or in
    fastpeft's strict mode, core/checks.py). Returns the differences (empty when they match or there is no
    fingerprint).
    """
    from ..core.checks import is_strict

    fingerprint = stored_fingerprint(model_id, **hub_kwargs)
    if fingerprint is None:
        return {}
    if key_mapping:  # the modules under the names the load maps the file's keys to
        fingerprint["modules"] = {io.remap_key(f"{name}.", key_mapping).removesuffix("."): entry
                                  for name, entry in fingerprint["modules"].items()}
    found = differences(model, fingerprint)
    if not found:
        return {}
    shown = "; ".join(f"{name}: {why}" for name, why in list(found.items())[:8])
    more = f" (and {len(found) - 8} more)" if len(found) > 8 else ""
    message = (
        f"Adapter '{adapter_name}' from {model_id} was saved on a different base model: {len(found)} of "
        f"{len(fingerprint['modules'])} targeted modules differ: {shown}{more}. Load it onto the base model "
        "it was trained on (a different dtype is fine); its outputs on this model are not the "
        "ones it was trained for."
    )
    if strict or is_strict():
        raise AdapterLoadError(message + " (strict mode refuses it; load without strict to accept it.)")
    logger.warning(message)
    return found
