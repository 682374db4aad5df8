"""`AdaLoraConfig`: HF PEFT 0.21.2's AdaLoRA fields and defaults (LoRA's fields plus the rank-allocation
schedule).

AdaLoRA (Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
https://openreview.net/forum?id=lq62uWRJjiY) trains W + B diag(E) A / r and prunes singular triplets (rows of
A, entries of E, columns of B) by importance. Training has three phases: `tinit` warm-up steps at full rank, a
budget that shrinks cubically from `init_r` to `target_r` per matrix until `total_step - tfinal`, and `tfinal`
steps at the final ranks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ...config import PeftConfig
from .._shared.common import lists_to_sets
from ..lora.config import LoraConfig

logger = logging.getLogger(__name__)

# LoRA options AdaLoRA has no use for (HF PEFT ignores or refuses them): option -> its "off" value
LORA_ONLY_OPTIONS: dict[str, Any] = {
    "use_dora": False,
    "loftq_config": {},
    "use_rslora": False,
    "alpha_pattern": {},
    "lora_bias": False,
    "use_qalora": False,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "megatron_config": None,
    "ensure_weight_tying": False,
}


@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA: SVD-form LoRA adapters whose ranks a `RankAllocator` prunes during training (see module
    doc)."""

    target_r: int = field(default=8, metadata={
        "size": "dim", "help": "Average rank per adapted matrix after pruning."})
    init_r: int = field(default=12, metadata={
        "size": "dim", "help": "Rank of every adapted matrix at the start."})
    tinit: int = field(default=0, metadata={"help": "Warm-up steps before any pruning."})
    tfinal: int = field(default=0, metadata={"help": "Final steps trained at the allocated ranks."})
    deltaT: int = field(default=1, metadata={"help": "Steps between two budget allocations."})
    beta1: float = field(default=0.85,
                         metadata={"help": "EMA factor of the sensitivity (importance) estimate."})
    beta2: float = field(default=0.85, metadata={"help": "EMA factor of the uncertainty estimate."})
    orth_reg_weight: float = field(default=0.5, metadata={
        "help": "Weight of the ||A A^T - I|| + ||B^T B - I|| regulariser added to the loss in forward."})
    total_step: int | None = field(default=None, metadata={"help": "Total training steps (required)."})
    rank_pattern: dict | None = field(default=None, metadata={
        "size": "dim_values",
        "help": "Set by update_and_allocate: '<module>.lora_E' -> list of bools, the singular triplets kept. "
                "Loading an adapter shrinks each module to the kept ranks (as HF PEFT)."})

    def __post_init__(self) -> None:
        PeftConfig.__post_init__(self)
        lists_to_sets(self)
        self.loftq_config = self.loftq_config or {}
        self.alpha_pattern = self.alpha_pattern or {}
        self._refuse_lora_only_options()
        self._validate_targets()
        self._validate_schedule()

    def _refuse_lora_only_options(self) -> None:
        used = [k for k, off in LORA_ONLY_OPTIONS.items() if getattr(self, k) not in (off, None, {}, False)]
        if used:
            raise ValueError(
                f"AdaLoraConfig does not support the LoRA options {used}; reset them to their defaults (use "
                "LoraConfig for them). AdaLoRA's own knobs are init_r, target_r and the "
                "tinit/tfinal schedule."
            )
        if not isinstance(self.init_lora_weights, bool):
            raise ValueError(
                "AdaLoraConfig.init_lora_weights must be True (E = 0, A and B ~ N(0, 0.02)) or False (all "
                f"random normal), got {self.init_lora_weights!r}."
            )
        if self.r != 8:
            logger.warning("AdaLoraConfig ignores r=%s: the starting rank is init_r (=%s).",
                           self.r, self.init_r)

    def _validate_targets(self) -> None:
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"AdaLoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a regex string.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform: say which layer indices to adapt.")
        for name in ("init_r", "target_r"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"AdaLoraConfig.{name} must be a positive integer, got {value!r}.")
        if not isinstance(self.deltaT, int) or self.deltaT <= 0:
            raise ValueError(f"AdaLoraConfig.deltaT must be a positive integer, got {self.deltaT!r}.")

    def _validate_schedule(self) -> None:
        if self.total_step is None or self.total_step <= 0:
            raise ValueError(
                "AdaLoraConfig needs total_step > 0 (the number of training steps, e.g. Trainer's "
                f"max_steps): got {self.total_step!r}."
            )
        if self.orth_reg_weight < 0:
            raise ValueError(f"AdaLoraConfig.orth_reg_weight must be >= 0, got {self.orth_reg_weight}.")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(
                    f"AdaLoraConfig.{name} must lie strictly between 0 and 1, got {getattr(self, name)}.")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"tinit={self.tinit}, tfinal={self.tfinal} and total_step={self.total_step} leave no steps "
                "for pruning (needs tinit < total_step - tfinal): lower tinit or tfinal, or raise total_step."
            )
