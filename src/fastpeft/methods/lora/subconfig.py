"""LoraConfig's feature options (eva_config, kasa_config, init_lora_weights, ...): their checks and coercion.

The checks are a registry: each feature module registers the check of its option here when it is imported
(methods/lora/__init__.py imports every feature), and `LoraConfig.__post_init__` runs them all. So the config
imports no feature module, while every feature may import the config.

A file holds a sub-config as a dict, code as an instance: `coerce` turns either into the feature's dataclass;
`for_init` adds the rules of sub-configs that belong to one `init_lora_weights` scheme (default instance when
missing, warning when set for another scheme).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import fields
from typing import Any

logger = logging.getLogger(__name__)

# LoraConfig option -> check(config): validates the option and may replace its value (a dict by its dataclass)
CHECKS: dict[str, Callable[[Any], None]] = {}


def register_check(option: str, check: Callable[[Any], None]) -> None:
    """Run `check(config)` in every LoraConfig's __post_init__ (one per option; a re-import replaces it)."""
    CHECKS[option] = check


def register_coercion(option: str, cls: type) -> None:
    """Register the check of an option that only needs a file's dict turned into `cls` (see `coerce`)."""
    def check(config) -> None:
        setattr(config, option, coerce(getattr(config, option), cls, option))

    register_check(option, check)


def run_checks(config) -> None:
    """Every registered check, in registration order (they do not depend on each other's results)."""
    for check in list(CHECKS.values()):
        check(config)


def coerce(value, cls: type, option: str):
    """`value` (None, a `cls` instance or a dict) as a `cls` instance or None.

    Dict keys that are fields of `cls` but not constructor arguments (kept by HF PEFT at run time) are dropped
    quietly; keys `cls` does not know are dropped with a warning.
    """
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"{option} must be a {cls.__name__}, a dict or None, got {type(value).__name__}.")
    unknown = sorted(set(value) - {f.name for f in fields(cls)})
    if unknown:
        logger.warning("%s: ignoring keys %s, which %s does not have.", option, unknown, cls.__name__)
    accepted = {f.name for f in fields(cls) if f.init}
    return cls(**{k: v for k, v in value.items() if k in accepted})


def for_init(value, cls: type, option: str, init_lora_weights, scheme: str, default: bool = True):
    """`coerce` for a sub-config used only by `init_lora_weights=scheme` (the default instance when
    missing)."""
    value = coerce(value, cls, option)
    if init_lora_weights == scheme and value is None and default:
        logger.warning("init_lora_weights=%r without %s: using the default %s().", scheme,
                       option, cls.__name__)
        value = cls()
    elif init_lora_weights != scheme and value is not None:
        logger.warning("%s is ignored unless init_lora_weights=%r.", option, scheme)
    return value
