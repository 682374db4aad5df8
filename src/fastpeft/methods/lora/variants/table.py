"""Which LoRA variant an adapter uses: one row per variant, checked in order; the first active row wins.

A row names the LoraConfig option that turns it on (for messages), a predicate over the config, the variant
class per layer kind (a kind missing from a row does not support the variant, as in HF PEFT) and an optional
check of the config that refuses combinations the variant cannot take. Variants live in their own modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..inits.mica import MiCA, MiCAEmbedding
from ..subconfig import register_check
from . import alora
from .alora import Alora
from .arrow import ArrowRouter, arrow_check
from .base import LoraVariant
from .bdlora import BdLora
from .dora import Dora, DoraConv, DoraEmbedding
from .dora_bnb import DoraQuant
from .kasa import Kasa
from .monteclora import Monteclora
from .velora import Velora


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
    # aLoRA first: its check refuses any other active row (HF PEFT has no combined variants with it)
    VariantRow(alora.OPTION, lambda c: bool(getattr(c, alora.OPTION, None)),
               {"linear": Alora, "bnb-linear": Alora}, lambda c: alone(alora.OPTION, c)),
    VariantRow("arrow_config", lambda c: getattr(c, "arrow_config", None) is not None,
               {"linear": ArrowRouter, "bnb-linear": ArrowRouter}, arrow_check),  # arrow.py; before DoRA
    # MiCA / KaSA / VeLoRA (../inits/mica.py, kasa.py, velora.py): before DoRA, so that their check refuses
    # combinations
    VariantRow("init_lora_weights='mica'", lambda c: getattr(c, "init_lora_weights", None) == "mica",
               {"linear": MiCA, "embedding": MiCAEmbedding}, lambda c: alone("init_lora_weights='mica'", c)),
    VariantRow("kasa_config", lambda c: getattr(c, "kasa_config", None) is not None,
               {"linear": Kasa}, lambda c: alone("kasa_config", c)),
    VariantRow("velora_config", lambda c: getattr(c, "velora_config", None) is not None,
               {"linear": Velora}, lambda c: alone("velora_config", c)),
    # BD-LoRA / MonteCLoRA (bdlora.py, monteclora.py): before DoRA, so that their check refuses combinations
    VariantRow("use_bdlora", lambda c: getattr(c, "use_bdlora", None) is not None,
               {"linear": BdLora}, lambda c: alone("use_bdlora", c)),
    VariantRow("monteclora_config", lambda c: getattr(c, "monteclora_config", None) is not None,
               {"linear": Monteclora}, lambda c: alone("monteclora_config", c)),
    VariantRow("use_dora", lambda c: bool(getattr(c, "use_dora", False)),
               {"linear": Dora, "embedding": DoraEmbedding, "conv": DoraConv, "bnb-linear": DoraQuant},
               _dora_check),
]


def alone(option: str, config) -> None:
    """Refuse other active variants and target_parameters next to `option` (HF PEFT has no such
    combination)."""
    others = [row.option for row in VARIANTS if row.option != option and row.active(config)]
    if others:
        raise ValueError(f"{option} cannot be combined with {others} (HF PEFT has no such combined LoRA "
                         "variant); turn one of them off.")
    if getattr(config, "target_parameters", None):
        raise ValueError(f"{option} does not work with target_parameters (LoRA on bare parameters takes no "
                         "variants, as in HF PEFT); adapt modules via target_modules instead.")


# aLoRA refuses its combinations on the config already (as HF PEFT), the other rows when a layer is built
register_check(alora.OPTION, lambda config: alora.check_config(config, lambda c: alone(alora.OPTION, c)))


def active_option(config) -> str | None:
    """The option of the variant `config` turns on (e.g. 'use_dora'); None for plain LoRA."""
    return next((row.option for row in VARIANTS if row.active(config)), None)


def choose(kind: str, config) -> LoraVariant | None:
    """The variant the config asks for on a layer of `kind`; None for plain LoRA. Refuses what HF PEFT
    refuses."""
    for row in VARIANTS:
        if not row.active(config):
            continue
        if row.check is not None:
            row.check(config)
        if kind not in row.by_kind:
            raise ValueError(f"{row.option} is not supported on {kind} layers (as in HF PEFT); turn it off "
                             "or leave these modules out of target_modules.")
        return row.by_kind[kind](config)
    return None
