"""Which LoRA variant an adapter uses: one row per variant, checked in order; the first active row wins.

A row names the LoraConfig option that turns it on (for messages), a predicate over the config, the variant class
per layer kind (a kind missing from a row does not support the variant, as in HF PEFT) and an optional check of
the config that refuses combinations the variant cannot take. Variants live in their own modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .variants import Dora, DoraConv, DoraEmbedding, LoraVariant


@dataclass(frozen=True)
class VariantRow:
    option: str
    active: Callable[[Any], bool]
    by_kind: dict[str, type[LoraVariant]]
    check: Callable[[Any], None] | None = None


def _dora_check(config) -> None:
    if getattr(config, "lora_bias", False):
        raise ValueError("lora_bias=True is not supported with DoRA (as in HF PEFT); set use_dora=False or "
                         "lora_bias=False.")


VARIANTS: list[VariantRow] = [
    VariantRow("use_dora", lambda c: bool(getattr(c, "use_dora", False)),
               {"linear": Dora, "embedding": DoraEmbedding, "conv": DoraConv}, _dora_check),
]


def active_option(config) -> str | None:
    """The option of the variant `config` turns on (e.g. 'use_dora'); None for plain LoRA."""
    return next((row.option for row in VARIANTS if row.active(config)), None)


def choose(kind: str, config) -> LoraVariant | None:
    """The variant the config asks for on a layer of `kind`; None for plain LoRA. Refuses what HF PEFT refuses."""
    for row in VARIANTS:
        if not row.active(config):
            continue
        if row.check is not None:
            row.check(config)
        if kind not in row.by_kind:
            raise ValueError(f"{row.option} is not supported on {kind} layers (as in HF PEFT); turn it off or leave "
                             "these modules out of target_modules.")
        return row.by_kind[kind]()
    return None
