"""Checks of an adapter_config.json's values before a config object (let alone a layer) is built from them.

Each value must fit its field's declared type (`int`, `list[str] | None`, `Literal[...]`, ...) and size-like
fields (ranks, token counts, block sizes) must stay below a bound: a config with r = 10**9 must be refused
before anything allocates r rows. Fields typed with something this module does not know are left to the config
class. A field is size-like when its declaration says so (dataclass metadata "size", see config.py
`SIZE_KINDS`).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import types
import typing
from typing import Any

from ..errors import AdapterConfigError

# the kinds of size a field may declare (metadata "size"): what each is bounded by is documented in config.py
DIM, MATRIX, DIM_VALUES, TOKEN_IDS = "dim", "matrix", "dim_values", "token_ids"
# bound without a model (file-level); with a model, model_size_bound() is tighter
FILE_SIZE_BOUND = 1 << 24
# longest list / dict a config value may hold (target_modules, rank_pattern, ...): each entry is matched
# against every module name, so a million-entry list would stall injection
MAX_ITEMS = 1 << 16


def check_config_values(config_cls: type, data: dict[str, Any], source: Any,
                        bound: int = FILE_SIZE_BOUND) -> None:
    """Refuse values of `data` (an adapter_config.json's dict) that do not fit `config_cls`' fields."""
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    hints = _hints(config_cls)
    for name, value in data.items():
        if name not in fields:
            continue
        field = fields[name]
        if value is None and field.default is None:
            continue
        if name in hints and not _fits(value, hints[name]):
            raise AdapterConfigError(
                f"{config_cls.__name__}.{name} in {source} is {_short(value)} ({type(value).__name__}); "
                f"expected {_shown(hints[name])}. Fix adapter_config.json (or re-save the adapter)."
            )
        check_size(config_cls.__name__, name, value, _lowest(field), bound, source, size_kind(field))
        _check_length(config_cls.__name__, name, value, source)


def _check_length(cls_name: str, name: str, value: Any, source: Any) -> None:
    if isinstance(value, (list, dict)) and len(value) > MAX_ITEMS:
        raise AdapterConfigError(f"{cls_name}.{name} in {source} holds {len(value)} entries (at most "
                                 f"{MAX_ITEMS}); the file is corrupt or was edited by hand.")


def check_indices(cls_name: str, name: str, value: Any, bound: int, source: Any) -> None:
    """Token ids (a list, or a dict of lists per embedding) must be in [0, bound), and at most `bound` of
    them."""
    lists = value.values() if isinstance(value, dict) else [value]
    ids = [i for ids in lists if isinstance(ids, list) for i in ids]
    if len(ids) > bound or any(isinstance(i, int) and not 0 <= i < bound for i in ids):
        raise AdapterConfigError(
            f"{cls_name}.{name} in {source} lists {len(ids)} token ids, some outside [0, {bound}): they must "
            "be rows of the base model's embedding."
        )


def size_kind(field: dataclasses.Field) -> str | None:
    """The kind of size `field` declares (metadata "size": DIM, MATRIX, DIM_VALUES or TOKEN_IDS), or None."""
    return field.metadata.get("size")


def check_size(cls_name: str, name: str, value: Any, lowest: int, bound: int, source: Any,
               kind: str | None) -> None:
    """Size fields (ints; for DIM_VALUES dicts of ints, e.g. module -> rank) must lie in [lowest, bound]."""
    if kind not in (DIM, MATRIX, DIM_VALUES):
        return
    values = value.values() if kind == DIM_VALUES and isinstance(value, dict) else [value]
    for v in values:
        if isinstance(v, list) and kind == DIM_VALUES:  # a list of flags stands for its length (rank masks)
            v = len(v) if all(isinstance(b, bool) for b in v) else v
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer() and lowest <= v <= bound:
                continue
            if v is None:
                continue
            raise AdapterConfigError(
                f"{cls_name}.{name} in {source} is {_short(v)}; it must be a whole number.")
        if not lowest <= v <= bound:
            raise AdapterConfigError(
                f"{cls_name}.{name}={_short(v)} in {source} is outside [{lowest}, {bound}]: no base model "
                "this adapter can load onto has a dimension that large. The file is corrupt "
                "or was edited by hand."
            )


def _lowest(field: dataclasses.Field) -> int:
    default = field.default
    return min(0, default) if isinstance(default, int) and not isinstance(default, bool) else 0


@functools.cache
def _hints(config_cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(config_cls)
    except Exception:  # an annotation we cannot evaluate: leave those fields to the config class
        return {}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _shown(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


# ---------------------------------------------------------------------------------------------- type matching
def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value can stand for a field annotated `hint` (lenient where JSON loses information)."""
    origin = typing.get_origin(hint)
    if origin is None:
        return _fits_plain(value, hint)
    check = _ORIGIN_CHECKS.get(origin)
    return True if check is None else check(value, typing.get_args(hint))


def _fits_plain(value: Any, hint: Any) -> bool:
    if hint is Any or not isinstance(hint, type):
        return True
    if hint is type(None):
        return value is None
    check = _PLAIN_CHECKS.get(hint)
    if check is not None:
        return check(value)
    if issubclass(hint, enum.Enum):
        return isinstance(value, (str, hint))
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (dict, hint))
    return True  # classes only Python callers pass (modules, callables): not this check's business


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_PLAIN_CHECKS = {
    bool: lambda v: isinstance(v, bool),
    # HF PEFT files may hold 16.0 where an int is declared (lora_alpha); sizes are checked apart
    int: _is_number,
    float: _is_number,
    str: lambda v: isinstance(v, str),
    list: lambda v: isinstance(v, list),
    tuple: lambda v: isinstance(v, list),
    dict: lambda v: isinstance(v, dict),
}


def _fits_union(value: Any, args: tuple) -> bool:
    return any(_fits(value, arg) for arg in args)


def _fits_sequence(value: Any, args: tuple) -> bool:
    if not isinstance(value, (list, tuple)):
        return False
    items = [a for a in args if a is not Ellipsis]
    if len(items) <= 1:
        return all(_fits(v, items[0]) for v in value) if items else True
    return len(items) == len(value) and all(_fits(v, a) for v, a in zip(value, items))


def _fits_mapping(value: Any, args: tuple) -> bool:
    if not isinstance(value, dict):
        return False
    return len(args) < 2 or all(_fits(v, args[1]) for v in value.values())


_ORIGIN_CHECKS = {
    typing.Union: _fits_union,
    types.UnionType: _fits_union,
    typing.Literal: lambda v, args: v in args,
    list: _fits_sequence,
    tuple: _fits_sequence,
    set: _fits_sequence,
    frozenset: _fits_sequence,
    dict: _fits_mapping,
}


# ------------------------------------------------------------------------------------------------ model bound
def _shape(param) -> tuple[int, ...]:
    """A parameter's real shape: DeepSpeed ZeRO-3 leaves shape-(0,) placeholders and keeps it in
    `ds_shape`."""
    return tuple(getattr(param, "ds_shape", None) or param.shape)


def _model_weights(model) -> list:
    """The model's parameters less those of loaded adapters (the walk leaves adapter layers' per-adapter
    entries out: the bound is the base model's, and a load into a model with 100 adapters stays cheap)."""
    from ..core import module_walk

    return module_walk.own_parameters(m for _, m in module_walk.named_modules(model, adapter=None))


def model_size_bound(model) -> int:
    """Largest sensible size for `model`: no rank, token count or block exceeds its largest weight
    dimension."""
    largest = max((max(_shape(p), default=0) for p in _model_weights(model)), default=0)
    return max(largest, 1024)


def matrix_size_bound(model) -> int:
    """Bound of MATRIX size fields: the element count of `model`'s largest weight (at least
    model_size_bound)."""
    largest = max((math.prod(_shape(p)) for p in _model_weights(model)), default=0)
    return max(largest, model_size_bound(model))


def check_config_for_model(config, model, source: Any) -> None:
    """Size fields of a loaded `config` against `model`'s dimensions, before any adapter tensor is
    allocated."""
    bound = model_size_bound(model)
    cls = type(config)
    for field in dataclasses.fields(cls):
        kind, value = size_kind(field), getattr(config, field.name, None)
        if kind == MATRIX:
            matrix_bound = matrix_size_bound(model)
            check_size(cls.__name__, field.name, value, _lowest(field), matrix_bound, source, kind)
        elif kind in (DIM, DIM_VALUES):
            check_size(cls.__name__, field.name, value, _lowest(field), bound, source, kind)
        elif kind == TOKEN_IDS and value is not None:
            check_indices(cls.__name__, field.name, value, bound, source)
    _check_prompt_table(config, model, source)


def _check_prompt_table(config, model, source: Any) -> None:
    """Prompt methods allocate virtual tokens x width (x 2 layers for key / value prefixes): refuse tables
    larger than the whole base model (counting the layers for every method: an upper bound)."""
    sizes = [getattr(config, n, None)
             for n in ("num_virtual_tokens", "token_dim", "num_transformer_submodules")]
    if not all(isinstance(s, int) and s > 0 for s in sizes):
        return
    layers = getattr(config, "num_layers", None)
    total = math.prod(sizes) * (2 * layers if isinstance(layers, int) and layers > 0 else 1)
    base = sum(math.prod(_shape(p)) for p in model.parameters())
    if total > 4 * base + (1 << 20):
        raise AdapterConfigError(
            f"The prompt table of {source} would hold {total} values, more than 4x the base model's {base} "
            "parameters: num_virtual_tokens / token_dim / num_layers do not fit this model."
        )


def check_file_config(requested_cls: type, data: dict[str, Any], source: Any) -> None:
    """Check an adapter_config.json dict against the config class it will build (`requested_cls`, or the class
    registered for its peft_type when `requested_cls` is a generic base)."""
    from ..registry import get_spec

    config_cls = requested_cls
    if getattr(requested_cls, "PEFT_TYPE", None) is None:
        peft_type = data.get("peft_type")
        if not isinstance(peft_type, str):
            raise AdapterConfigError(
                f"{source} has peft_type {_short(peft_type)}; it is not an adapter config.")
        config_cls = get_spec(peft_type).config_cls
    check_config_values(config_cls, data, source)
