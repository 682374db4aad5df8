"""requires_grad of adapter parameters set by hand (`set_requires_grad`), on top of what activation sets."""

from __future__ import annotations

from collections.abc import Iterable


def apply_overrides(holders: Iterable, overrides: dict[str, bool]) -> None:
    """For each adapter name in `overrides`: its parameters in every holder train or not as given, except
    the ones its holder keeps frozen (saved, never trained, e.g. MiCA's fixed B)."""
    for holder in holders:
        for name, requires_grad in overrides.items():
            frozen = {id(p) for p in holder.frozen_parameters(name)}
            for _, param in holder.adapter_parameters(name):
                param.requires_grad_(requires_grad and id(param) not in frozen)
