"""Config options that select modules but select nothing, and targets no layer class can wrap.

HF PEFT ignores an `exclude_modules` entry, a `layers_to_transform` index or a `rank_pattern`
/ `alpha_pattern` key that matches no module (at most one warning when no module at all was excluded), so a
typo silently trains the wrong thing. Here each such entry is an error with the module names that come
closest. When an adapter is loaded from a file the weights decide what exists, so there it is only a warning
(an error in strict mode).

Matched targets that the method cannot wrap are all listed in one error (HF PEFT stops at the first one).
"""

from __future__ import annotations

import difflib
import re

from torch import nn

from ..errors import AdapterConfigError
from . import checks, targeting
from .layer import AdapterHolder

_CLOSE = 5


def _close(word: str, names: list[str]) -> list[str]:
    """Module names (or their last parts) that look like `word`."""
    pool = sorted(set(names) | {n.rsplit(".", 1)[-1] for n in names})
    return difflib.get_close_matches(word, pool, n=_CLOSE, cutoff=0.5)


def _suffix_match(entry: str, name: str) -> bool:
    return name == entry or name.endswith(f".{entry}")


def _unused_excludes(config, names: list[str]) -> list[str]:
    spec = getattr(config, "exclude_modules", None)
    if not spec:
        return []
    if isinstance(spec, str):
        if any(re.fullmatch(spec, n) for n in names):
            return []
        return [f"exclude_modules={spec!r} (a full-match regex) matches no module; close names: "
                f"{_close(spec, names)}"]
    return [f"exclude_modules entry {e!r} matches no module (exact name or dotted suffix); close names: "
            f"{_close(e, names)}" for e in sorted(spec) if not any(_suffix_match(e, n) for n in names)]


def _unused_layers(config, names: list[str]) -> list[str]:
    wanted = getattr(config, "layers_to_transform", None)
    targets = getattr(config, "target_modules", None)
    if wanted is None or wanted == [] or not isinstance(targets, (list, set, tuple)):
        return []
    pattern = getattr(config, "layers_pattern", None)
    found = {targeting.layer_index(n, pattern) for n in names if any(_suffix_match(t, n) for t in targets)}
    found.discard(None)
    missing = sorted(({wanted} if isinstance(wanted, int) else set(wanted)) - found)
    if not missing:
        return []
    where = f" (layers_pattern={pattern!r})" if pattern else ""
    return [f"layers_to_transform indices {missing} match no layer of the targeted modules{where}; their "
            f"layer indices are {sorted(found)}"]


def _unused_pattern_keys(config, attr: str, target_names: list[str]) -> list[str]:
    problems = []
    for key in getattr(config, attr, None) or {}:
        try:
            hit = any(re.match(rf"(.*\.)?({key})$", n) for n in target_names)
        except re.error as exc:
            problems.append(f"{attr} key {key!r} is not a valid regex ({exc})")
            continue
        if not hit:
            problems.append(f"{attr} key {key!r} matches no targeted module (keys match a module name or its "
                            f"dotted suffix, as a regex); close targeted names: {_close(key, target_names)}")
    return problems


def _unused_patterns(config, target_names: list[str]) -> list[str]:
    # the config says which of its fields are keyed by module patterns (PeftConfig.module_pattern_fields)
    fields = getattr(config, "module_pattern_fields", ())
    return [p for attr in fields for p in _unused_pattern_keys(config, attr, target_names)]


def check_unused_entries(config, model: nn.Module, targets: list[tuple[str, object]]) -> None:
    """Refuse option entries that select nothing; a warning while loading a file."""
    names = [n for n, _ in targeting.candidate_modules(model, (AdapterHolder,))]
    problems = (_unused_excludes(config, names) + _unused_layers(config, names)
                + _unused_patterns(config, [n for n, _ in targets]))
    if not problems:
        return
    message = ("Adapter config entries that select nothing (typo, or a config written for another model?): "
               + "; ".join(problems) + ". Fix or remove these entries.")
    if checks.is_loading_file():
        checks.warn_or_raise(message)
        return
    raise AdapterConfigError(message)


def check_supported(dispatch, targets: list[tuple[str, object]]) -> None:
    """List every matched module the method cannot wrap, with its type."""
    if dispatch is None:
        return
    bad: dict[str, str] = {}
    first: ValueError | None = None
    for name, module in targets:
        if isinstance(module, AdapterHolder):
            continue
        try:
            dispatch.resolve(module, name)
        except ValueError as exc:
            bad[name] = type(module).__name__
            first = first or exc
    if first is None:
        return
    shown = dict(list(bad.items())[:12])
    more = f" and {len(bad) - len(shown)} more" if len(bad) > len(shown) else ""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in bad})
    raise AdapterConfigError(
        f"{first} In all, {len(bad)} module(s) matched by target_modules cannot be adapted: {shown}{more}. "
        f"Skip them with exclude_modules={suffixes!r}, or narrow target_modules to the layers inside them."
    ) from None


def check_targets(tuner, model: nn.Module, config, targets: list[tuple[str, object]]) -> None:
    """Both checks, run by Tuner.inject_adapter on the selected targets before any layer is built."""
    check_supported(getattr(tuner, "dispatch", None), targets)
    check_unused_entries(config, model, targets)
