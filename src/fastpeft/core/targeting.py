"""Which modules an adapter config targets: pure functions over module names.

Semantics follow HF PEFT: a list entry matches a name exactly or as its dotted suffix, a string is a
full-match regex; `layers_to_transform` / `layers_pattern` keep only given layer indices.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from torch import nn

from . import module_walk

ALL_LINEAR = "all-linear"
DEFAULT_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")
SEQ_CLS_HEAD_NAMES = ("score", "classifier")


def _list_match(names: Iterable[str], key: str) -> bool:
    return any(key == n or key.endswith(f".{n}") for n in names)


def _pattern_match(spec: str | Iterable[str] | None, key: str) -> bool:
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return _list_match(spec, key)


def is_excluded(config, key: str) -> bool:
    if _pattern_match(getattr(config, "exclude_modules", None), key):
        return True
    modules_to_save = getattr(config, "modules_to_save", None) or []
    return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save)


def layer_index(key: str, layers_pattern: str | list[str] | None) -> int | None:
    if not layers_pattern:
        match = DEFAULT_LAYER_INDEX.match(key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    return int(match.group("idx")) if match else None


def is_target(config, key: str) -> bool:
    """Does module name `key` get an adapter under `config`?"""
    if is_excluded(config, key):
        return False
    targets = config.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if not _list_match(targets, key):
        return False
    wanted = getattr(config, "layers_to_transform", None)
    if wanted is None or (isinstance(wanted, list) and not wanted):
        return True
    index = layer_index(key, getattr(config, "layers_pattern", None))
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted


def pattern_value(patterns: dict[str, object] | None, key: str, default):
    """Value of the first `rank_pattern` / `alpha_pattern` entry matching module `key` as a suffix."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def candidate_modules(model: nn.Module, holder_types: tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    """Named modules, skipping the insides of adapter holders (their base layer and adapter weights)."""
    out: list[tuple[str, nn.Module]] = []
    skip: str | None = None
    for name, module in module_walk.named_modules(model, adapter=None, remove_duplicate=False):
        if skip is not None and name.startswith(skip):
            continue
        skip = None
        if not name:
            continue
        out.append((name, module))
        if isinstance(module, holder_types):
            skip = f"{name}."
    return out


def close_matches(config, names: list[str], limit: int = 8) -> list[str]:
    """Module names that look like what `target_modules` asked for, for error messages."""
    targets = config.target_modules
    wanted = [targets] if isinstance(targets, str) else list(targets or [])
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    found: list[str] = []
    for want in wanted:
        found += difflib.get_close_matches(want.rsplit(".", 1)[-1], suffixes, n=limit, cutoff=0.5)
    return sorted(set(found))[:limit] or suffixes[:limit]


def all_linear_targets(model: nn.Module, task_type, is_linear) -> set[str]:
    """`target_modules="all-linear"`: every linear layer (`is_linear(module)`) except the output head."""
    from .layer import AdapterHolder, AdapterLayer

    names = set()
    for name, module in candidate_modules(model, (AdapterHolder,)):
        inner = module.get_base_layer() if isinstance(module, AdapterLayer) else module
        if is_linear(inner):
            names.add(name)
    head = None
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        head = get_output()
        if head is None and task_type == "SEQ_CLS":
            head = next(
                (getattr(model, h) for h in SEQ_CLS_HEAD_NAMES if getattr(model, h, None) is not None), None)
    if head is not None:
        names -= {n for n, m in model.named_modules() if m is head}
    return names


CONDENSE_FROM = 20  # target lists this long (e.g. every module name, from diffusers loaders) get condensed


def _suffixes(name: str) -> list[str]:
    """Dotted suffixes of `name`, shortest first: "a.b.c" -> ["c", "b.c", "a.b.c"]."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]


def condense_targets(targets: set[str], module_names: list[str]) -> set[str]:
    """A smaller set of name suffixes selecting exactly the same modules (HF PEFT saves the condensed list).

    Greedy, deterministic: for each target in sorted order of its suffix list, keep its shortest suffix that
    no untargeted module ends with, unless a suffix kept already covers it.
    """
    ends = tuple(f".{t}" for t in targets)
    others = {s for n in module_names if n not in targets and not n.endswith(ends) for s in _suffixes(n)}
    kept: set[str] = set()
    for name, suffixes in sorted(((t, _suffixes(t)) for t in targets), key=lambda item: item[1]):
        if any(name.endswith(f".{k}") for k in kept):
            continue
        choice = next((s for s in suffixes if s not in kept and s not in others), None)
        if choice is not None:
            kept.add(choice)
    return kept if kept and len(kept) < len(targets) else set(targets)


def filters_note(config) -> str:
    """The options that narrow target_modules, for the no-match error: " (after ...)" or ""."""
    shown = [f"{option}={getattr(config, option, None)!r}"
             for option in ("exclude_modules", "layers_to_transform", "layers_pattern")
             if getattr(config, option, None) not in (None, [], "")]
    return f" (after {', '.join(shown)})" if shown else ""
