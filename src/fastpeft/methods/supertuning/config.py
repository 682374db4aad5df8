"""`SupertuningConfig`: HF PEFT 0.21's fields, defaults and checks for Super-Tuning (sparse entries of the
weight, chosen by magnitude; optionally a LoRA pair on top: "Supra")."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ...config import PeftConfig
from .._shared.common import lists_to_sets

logger = logging.getLogger(__name__)


@dataclass
class SupertuningConfig(PeftConfig):
    """Train the (1 - sparsity) fraction of each weight's entries with the largest (or smallest) magnitude,
    the rest of the weight frozen (https://arxiv.org/abs/2607.09287); with `r`, a LoRA pair scaled by
    lora_alpha / r is added on top (the paper's Supra hybrid)."""

    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "nn.Linear modules to adapt: names (or dotted suffixes), a full-match regex or 'all-linear'; "
                "default: the model type's attention projections."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})
    sparsity: float = field(default=0.99, metadata={
        "help": "Fraction of each weight left frozen, in [0, 1): 0.99 trains 1% of the entries."})
    select_top: bool = field(default=True, metadata={
        "help": "True: train the largest-magnitude entries (Super / Supra); False: the smallest "
                "('-bottom')."})
    r: int | None = field(default=None, metadata={
        "size": "dim", "help": "Rank of the added LoRA pair (Supra); None: sparse entries only (Super)."})
    lora_alpha: float | None = field(default=None, metadata={
        "help": "LoRA scale numerator (scale lora_alpha / r); default 2 * r. Only with r."})
    lora_dropout: float = field(default=0.0, metadata={
        "help": "Dropout on the LoRA pair's input, in [0, 1). Only with r."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: sparse values and LoRA B start at zero (no change at start); False: random values "
                "(standard normal) and a Kaiming-uniform B."})
    save_precomputed_indices: bool = field(default=True, metadata={
        "help": "Store the chosen entries' positions with the adapter; False: recomputed from the base "
                "weight's magnitudes on load (the same base weights are needed: ties may break "
                "differently)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        lists_to_sets(self, names=("target_modules",))
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
                or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"SupertuningConfig.sparsity must be in [0.0, 1.0), got {self.sparsity!r}.")
        if self.r is not None:
            if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
                raise ValueError(f"SupertuningConfig.r must be a positive integer or None, got {self.r!r}.")
            if self.lora_alpha is None:
                self.lora_alpha = 2 * self.r
        elif self.lora_alpha is not None:
            raise ValueError("SupertuningConfig.lora_alpha is set but r is None: the LoRA pair (Supra mode) "
                             "needs an explicit r.")
        dropout = self.lora_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"SupertuningConfig.lora_dropout must be in [0.0, 1.0), got {dropout!r}.")
        if not self.save_precomputed_indices:
            logger.warning("SupertuningConfig(save_precomputed_indices=False): the trained entries' "
                           "positions are recomputed from the base weight's magnitudes on load, which needs "
                           "the very same base weights (ties may break differently).")
