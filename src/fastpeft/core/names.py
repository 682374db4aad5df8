"""Adapter names: the rules every entry point checks before a name becomes a folder, key or module name."""

from __future__ import annotations

import re

from ..errors import AdapterNameError
from ..registry import registered

_ADAPTER_NAME_RE = re.compile(r"[A-Za-z0-9_\-]+")
# in mixed batches (adapter_names=[...]) such rows run without adapters
RESERVED_ADAPTER_NAMES = ("__base__",)


def _clashing_prefix(name: str) -> str | None:
    """The registered method parameter prefix (e.g. "lora_") that `name` starts with, if any."""
    return next((spec.prefix for spec in registered().values()
                 if spec.prefix and name.startswith(spec.prefix)), None)


def check_adapter_name(name: str) -> None:
    """Adapter names become folder names, nn.ModuleDict keys and state-dict key parts: letters, digits, '_'
    and '-' only ('.' is refused too: torch refuses it in module names, so HF PEFT fails on it with a
    KeyError), not starting with a method's parameter prefix (keys like `lora_A.lora_x.weight` would be
    ambiguous), not a reserved name."""
    if not isinstance(name, str) or not _ADAPTER_NAME_RE.fullmatch(name):
        raise AdapterNameError(
            f"Invalid adapter name {name!r}: use a non-empty name of letters, digits, '_' or '-' only "
            "(no '/', '\\\\', '.' or spaces), since the name is a sub-folder of the save directory, a module "
            "name and part of state-dict keys."
        )
    if name in RESERVED_ADAPTER_NAMES:
        raise AdapterNameError(f"Invalid adapter name {name!r}: it is reserved (an adapter_names entry "
                               f"{name!r} in a mixed batch means 'no adapter'); pick another name.")
    prefix = _clashing_prefix(name)
    if prefix is not None:
        raise AdapterNameError(
            f"Invalid adapter name {name!r}: it starts with {prefix!r}, the prefix of adapter parameter "
            f"names, so state-dict keys could not tell the name from a parameter; rename it, e.g. to "
            f"{name[len(prefix):] or 'adapter'!r}."
        )


def known_adapters(configs: dict, adapter_names: str | list[str]) -> list[str]:
    """`adapter_names` as a list, each one a key of `configs` (the loaded adapters), else a ValueError
    naming the unknown ones."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    missing = [n for n in names if n not in configs]
    if missing:
        raise ValueError(f"Unknown adapter(s) {missing}; loaded adapters: {sorted(configs)}.")
    return names
