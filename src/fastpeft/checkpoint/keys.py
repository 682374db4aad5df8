"""Pure mapping between a model's adapter parameters and the keys of an adapter file.

A file key is the parameter's name in the model with the adapter name removed
(`...q_proj.lora_A.default.weight` -> `...q_proj.lora_A.weight`; a modules_to_save copy
`head.modules_to_save.default.weight` -> `head.weight`). Built from the layers' declared parameters, never by
matching substrings, and used in both directions (save and load).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core import module_walk
from ..core.auxiliary import ModulesToSaveWrapper
from ..core.layer import AdapterHolder, AdapterLayer
from ..core.targeting import is_target
from ..core.transaction import Transaction, swap_in
from ..errors import AdapterLoadError, AdapterShapeError
from ..registry import get_spec

logger = logging.getLogger(__name__)


def _file_key(prefix: str, local_key: str, adapter_name: str, holder: AdapterHolder) -> str:
    parts = local_key.split(".")
    at = parts.index(adapter_name)  # the adapter name is exactly one path component of the local key
    label = getattr(holder, "file_adapter_label", None)  # a format that keeps a fixed name there
    if label is None:
        del parts[at]
    else:
        parts[at] = label
    if len(parts) == 2 and parts[0] in holder.file_bare_entries and parts[1] == "weight":
        parts = parts[:1]  # stored under the container's name (AdapterHolder.file_bare_entries)
    if isinstance(holder, ModulesToSaveWrapper):
        parts = parts[1:]  # drop "modules_to_save": the copy is stored at the module's own path
    return ".".join([prefix, *parts]) if prefix else ".".join(parts)


Modules = list[tuple[str, nn.Module]]  # model.named_modules(), walked once per save / load and shared


def adapter_key_map(model: nn.Module, adapter_name: str, config) -> dict[str, str]:
    """{file key: model parameter name} for every tensor of `adapter_name` stored in adapter files."""
    return _key_map_and_tensors(model, adapter_name, config, list(model.named_modules()))[0]


def _key_map_and_tensors(model: nn.Module, adapter_name: str, config, modules: Modules
                         ) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """`adapter_key_map` plus {model key: tensor} for the keys found on adapter holders (not the bias
    ones)."""
    mapping: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in modules:
        if not isinstance(module, AdapterHolder):
            continue
        for local_key, tensor in module.adapter_tensors(adapter_name):
            model_key = f"{prefix}.{local_key}" if prefix else local_key
            mapping[_file_key(prefix, local_key, adapter_name, module)] = model_key
            tensors[model_key] = tensor
    for file_key, model_key in _base_keys(model, adapter_name, config, modules):
        mapping.setdefault(file_key, model_key)
    return mapping, tensors


def _model_tensors(model: nn.Module, found: dict[str, torch.Tensor], wanted) -> dict[str, torch.Tensor]:
    """`found` when it holds every `wanted` model key, else the model's full parameters and state (slower)."""
    if all(key in found for key in wanted):
        return found
    source = dict(model.named_parameters())
    source.update(model.state_dict(keep_vars=True))
    return source


def _base_keys(model: nn.Module, adapter_name: str, config, modules: Modules) -> list[tuple[str, str]]:
    """(file key, model key) of base-model tensors that the adapter's method stores too (e.g. trained
    biases): its tuner's `base_file_keys`, looked up by type (a model injected without a PeftModel has no
    tuner)."""
    tuner_cls = None if config is None else get_spec(config.peft_type).tuner_cls
    return [] if tuner_cls is None else tuner_cls.base_file_keys(model, adapter_name, config, modules)


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _targets_embedding(config, modules: Modules) -> bool:
    """Whether target_modules names an embedding layer (a regex: matches a module called like one)."""
    targets = getattr(config, "target_modules", None)
    if not isinstance(targets, str):
        return any(n in (targets or ()) for n in EMBEDDING_LAYER_NAMES)
    return any(is_target(config, name) for name, _ in modules
               if name.endswith(EMBEDDING_LAYER_NAMES) and name.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES)


def _embedding_keys(model: nn.Module, adapter_name: str, config, save_embedding_layers: str | bool,
                    modules: Modules) -> list[str]:
    """Full embedding weights stored with the adapter (for a resized vocabulary), as HF PEFT does.

    "auto" saves them when target_modules names an embedding layer, or when the vocabulary differs from the
    base model's saved config (a resized embedding: its file alone could not rebuild the model); True also
    saves the model's untargeted input / output embeddings.
    """
    targets_embedding = _targets_embedding(config, modules)
    if save_embedding_layers == "auto":  # trained token rows are stored as rows (as HF PEFT)
        rows = config is not None and config.trains_token_rows
        save_embedding_layers = (targets_embedding and not rows) or _vocab_resized(model, config)
    if not save_embedding_layers:
        return []
    keys = []
    wanted: set[int] = set()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        layer = getattr(base, getter, lambda: None)()
        if layer is not None:
            wanted.add(id(layer))
    for prefix, module in modules:
        named_embedding = prefix.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES
        # adapter_names() only where it decides something: on embedding-named or wanted layers
        if isinstance(module, AdapterLayer) and (named_embedding or id(module) in wanted) \
                and adapter_name in module.adapter_names():
            if named_embedding:
                keys.append(f"{prefix}.base_layer.weight")
        elif id(module) in wanted and not targets_embedding and getattr(module, "weight", None) is not None:
            keys.append(f"{prefix}.weight")
    return keys


def _vocab_resized(model: nn.Module, config) -> bool:
    """Whether the model's vocab_size differs from the one in its base model's config.json (a local folder,
    or a Hub repo when it can be reached; otherwise assumed unchanged, with a warning), as HF PEFT decides."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    model_id = getattr(config, "base_model_name_or_path", None)
    if not vocab or not model_id:
        return False
    if not os.path.exists(os.path.join(model_id, "config.json")) and not _hub_has_config(model_id):
        return False
    try:
        saved = type(model.config).from_pretrained(model_id)
    except Exception as err:  # a best-effort check (as HF PEFT's): a save never fails on it
        logger.warning("Could not read the base model's config at %s (%s): embeddings not saved; pass "
                       "save_embedding_layers=True if the vocabulary was resized.", model_id, err)
        return False
    if getattr(saved, "vocab_size", vocab) == vocab:
        return False
    logger.warning("Saving the embedding layers with the adapter: the vocabulary was resized (%s -> %s).",
                   saved.vocab_size, vocab)
    return True


def _hub_has_config(model_id: str) -> bool:
    try:
        from huggingface_hub import file_exists
        from huggingface_hub.utils import HFValidationError

        return file_exists(model_id, "config.json")
    except (HFValidationError, ValueError):  # not a repo id
        return False
    except Exception as err:  # offline, no network: as HF PEFT, assume the vocabulary was not resized
        logger.warning("Could not find a config file for %s (%s): assuming the vocabulary was not resized; "
                       "pass save_embedding_layers=True if it was.", model_id, type(err).__name__)
        return False


def get_peft_model_state_dict(model: nn.Module, state_dict: dict | None = None, adapter_name: str = "default",
                              unwrap_compiled: bool = False, save_embedding_layers: str | bool = "auto"
                              ) -> dict[str, torch.Tensor]:
    """The tensors of `adapter_name` keyed as in `adapter_model.safetensors`."""
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    _check_known(model, adapter_name)
    return file_state(model, adapter_name, list(model.named_modules()), state_dict, save_embedding_layers)


def file_state(model: nn.Module, adapter_name: str, modules: Modules, state_dict: dict | None = None,
               save_embedding_layers: str | bool = "auto") -> dict[str, torch.Tensor]:
    """`get_peft_model_state_dict` over `modules` (`model.named_modules()`, walked once by the caller)."""
    config = _config_of(model, adapter_name)
    mapping, tensors = _key_map_and_tensors(model, adapter_name, config, modules)
    embeddings = _embedding_keys(model, adapter_name, config, save_embedding_layers, modules)
    mapping.update({k: k for k in embeddings})
    source = state_dict if state_dict is not None else _model_tensors(model, tensors, mapping.values())
    out = {fk: source[mk].detach() for fk, mk in mapping.items() if mk in source}
    tuner = getattr(model, "tuner", None)
    if tuner is not None:
        out.update(tuner.extra_file_state(adapter_name))
    return out


Mismatch = tuple[str, tuple[int, ...], tuple[int, ...]]  # (file key, shape in the file, shape in the model)


@dataclass
class ModuleLoadReport:
    """What did not fit in one module of the model (its path as in `named_modules()`)."""

    module: str
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[Mismatch] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"  missing (left at init): {k}" for k in self.missing_keys]
        out += [f"  unexpected (in the file, not in the model): {k}" for k in self.unexpected_keys]
        out += [f"  shape mismatch: {k} is {tuple(f)} in the file, {tuple(m)} in the model"
                for k, f, m in self.mismatched_keys]
        return [f"module '{self.module or '<root>'}':", *out]


@dataclass
class LoadResult:
    """Same fields as torch's `_IncompatibleKeys` (and iterates like it: missing, then unexpected keys), plus
    the shape mismatches and every problem grouped by module path in `modules`."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[Mismatch] = field(default_factory=list)
    modules: dict[str, ModuleLoadReport] = field(default_factory=dict)

    def __iter__(self):
        return iter((self.missing_keys, self.unexpected_keys))

    @property
    def clean(self) -> bool:
        """True when every adapter tensor was found in the file with the model's shape and nothing was left
        over."""
        return not (self.missing_keys or self.unexpected_keys or self.mismatched_keys)

    def describe(self) -> str:
        return "\n".join(line for report in self.modules.values() for line in report.lines())


def _module_finder(modules: Modules):
    """key -> the module it belongs to: the deepest adapter holder on its path, else the deepest module."""
    holders = {name for name, m in modules if isinstance(m, AdapterHolder)}
    names = {name for name, _ in modules}

    def find(key: str) -> str:
        parts = key.split(".")
        fallback = None
        for i in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in holders:
                return prefix
            if fallback is None and prefix in names:
                fallback = prefix
        return fallback or ""

    return find


def _group_by_module(result: LoadResult, modules: Modules) -> None:
    find = _module_finder(modules)
    grouped: dict[str, ModuleLoadReport] = {}
    for attr, entries in (("missing_keys", result.missing_keys), ("unexpected_keys", result.unexpected_keys),
                          ("mismatched_keys", result.mismatched_keys)):
        for entry in entries:
            key = entry if isinstance(entry, str) else entry[0]
            module = find(key)
            getattr(grouped.setdefault(module, ModuleLoadReport(module)), attr).append(entry)
    result.modules = dict(sorted(grouped.items()))


def _shape_error(result: LoadResult) -> AdapterShapeError:
    shown = "\n".join(f"  {k}: {tuple(f)} in the file, {tuple(m)} in the model"
                      for k, f, m in result.mismatched_keys)
    err = AdapterShapeError(
        f"{len(result.mismatched_keys)} adapter weight(s) have another shape in the file than in the model:\n"
        f"{shown}\nThe adapter was trained for a different base model (or a different r / rank_pattern). "
        "Nothing was loaded; load it onto the base model it was made for, or pass "
        "ignore_mismatched_sizes=True to skip these tensors."
    )
    err.report = result
    return err


def _adapter_tensors(modules: Modules, adapter_name: str):
    """Parameters and buffers whose key has `adapter_name` as one of its dotted parts (adapter layers, prompt
    encoders, shared banks / projections): what a load into that adapter may write besides the file's
    targets."""
    for prefix, module in modules:
        in_path = adapter_name in prefix and adapter_name in prefix.split(".")
        for store in (module._parameters, module._buffers):
            for local, tensor in store.items():
                if tensor is not None and (in_path or local == adapter_name):
                    yield tensor


def write_tensor(target: torch.Tensor, value: torch.Tensor) -> None:
    """Load `value` into `target` in its dtype. A target built on the meta device (low_cpu_mem_usage) takes
    a copy of `value` as its data, on `value`'s device (the tuner then moves it next to its base layer)."""
    if target.is_meta:
        swap_in(target, value.to(dtype=target.dtype, copy=True))
    else:
        target.copy_(value.to(device=target.device, dtype=target.dtype))


def _check_strict(result: LoadResult, strict: bool) -> None:
    if strict and not result.clean:
        err = AdapterLoadError(
            "strict=True: the adapter file does not match the model's adapter exactly; nothing was loaded.\n"
            f"{result.describe()}\nLoad the file onto the base model and config it was saved from, or load "
            "with strict=False to accept these differences (missing tensors stay at their init values)."
        )
        err.report = result
        raise err


def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False, strict: bool = False) -> LoadResult:
    """Copy file tensors into the model's adapter `adapter_name`, all or nothing.

    Every shape is checked before anything is written. If a method's own hook or a write fails (or, with
    `strict=True`, any key is missing, unexpected or mismatched) every tensor the load wrote gets its old
    value back: the adapter's own tensors (kept before any method hook runs) and the base tensors the file
    maps to (embeddings, biases). One transaction (core/transaction.py): inside a load it joins the load's,
    which copies only tensors that outlive its rollback (an adapter the same load created is dropped anyway).
    """
    _check_known(model, adapter_name)
    tuner = getattr(model, "tuner", None)
    # one walk for the copies and the key map; other adapters' per-adapter entries play no part in it
    modules = module_walk.named_modules(model, adapter=adapter_name)
    with Transaction(model) as tx:
        if tuner is not None:
            tx.keep_values(_adapter_tensors(modules, adapter_name))
        return _load_checked(model, peft_model_state_dict, adapter_name, ignore_mismatched_sizes, strict, tx,
                             modules)


def _load_checked(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str,
                  ignore_mismatched: bool, strict: bool, tx: Transaction, modules: Modules) -> LoadResult:
    tuner = getattr(model, "tuner", None)
    convert = getattr(tuner, "convert_loaded_state", None)
    # e.g. adapters saved for an older layout of the base model (LoRA on v4 MoE models)
    if convert is not None:
        state = convert(adapter_name, state, model)
        modules = module_walk.named_modules(model, adapter=adapter_name)  # a hook may change the tree
    config = _config_of(model, adapter_name)
    mapping, tensors = _key_map_and_tensors(model, adapter_name, config, modules)
    embeddings = {k: k for k in _embedding_keys(model, adapter_name, config, True, modules) if k in state}
    wanted = [mk for fk, mk in mapping.items() if fk in state] + list(embeddings)
    params = _model_tensors(model, tensors, wanted)
    result = LoadResult(unexpected_keys=sorted(set(state) - set(mapping) - set(embeddings)))
    result.missing_keys = sorted(mk for fk, mk in mapping.items() if fk not in state)
    writes = []
    for file_key, value in state.items():
        model_key = mapping.get(file_key) or embeddings.get(file_key)
        if model_key is None:
            continue
        target = params[model_key]
        if tuple(target.shape) != tuple(value.shape):
            result.mismatched_keys.append((file_key, tuple(value.shape), tuple(target.shape)))
            continue
        writes.append((target, value))
    if result.mismatched_keys and not ignore_mismatched:
        _group_by_module(result, modules)
        raise _shape_error(result)
    for file_key, in_file, in_model in result.mismatched_keys:
        logger.warning("Skipping %s: shape %s in file vs %s in model.", file_key, in_file, in_model)
    tx.keep_values(target for target, _ in writes)  # e.g. base embeddings and biases the file holds
    _write_all(result, tuner, adapter_name, state, writes)
    _check_no_meta_left(modules, adapter_name)
    _group_by_module(result, modules)
    _check_strict(result, strict)
    return result


def _write_all(result: LoadResult, tuner, adapter_name: str, state: dict[str, torch.Tensor], writes) -> None:
    if tuner is not None:  # tensors kept outside the module tree (e.g. prompt embeddings): checked and loaded
        rest = {k: v for k, v in state.items() if k in result.unexpected_keys}
        consumed = tuner.load_extra_file_state(adapter_name, rest)
        result.unexpected_keys = [k for k in result.unexpected_keys if k not in consumed]
    empty = any(target.is_meta for target, _ in writes)
    with torch.no_grad():
        for target, value in writes:
            write_tensor(target, value)
    if empty and tuner is not None and hasattr(tuner, "place_loaded"):
        tuner.place_loaded(adapter_name)


def _check_no_meta_left(modules: Modules, adapter_name: str) -> None:
    """Adapter weights created on the meta device (low_cpu_mem_usage) that the file did not fill would fail
    on first use with an unrelated message; refuse the load instead (it is rolled back)."""
    # each module's own parameters read directly (named_parameters per module costs ~5x at ~15k modules)
    left = [f"{prefix}.{name}" if prefix else name for prefix, module in modules
            for name, tensor in module._parameters.items() if tensor is not None and tensor.is_meta and
            adapter_name in f"{prefix}.{name}".split(".")]
    if left:
        raise AdapterLoadError(
            f"The adapter file has no values for {len(left)} weight(s) of adapter '{adapter_name}' created "
            f"without memory (low_cpu_mem_usage=True), e.g. {left[:3]}; nothing was loaded. Load a file that "
            "holds every adapter weight, or build the adapter with low_cpu_mem_usage=False."
        )


def _check_known(model: nn.Module, adapter_name: str) -> None:
    """KeyError (as HF PEFT) for a name the model's adapters lack: a typo would save an empty file, or load
    nothing with every key unexpected."""
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and adapter_name not in configs:
        raise KeyError(f"No adapter named {adapter_name!r} in this model; its adapters: {sorted(configs)}. "
                       "Pass one of them as adapter_name.")


def _config_of(model: nn.Module, adapter_name: str):
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and adapter_name in configs:
        return configs[adapter_name]
    return None
