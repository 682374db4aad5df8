"""`EvaConfig`: settings of EVA, the data-driven LoRA init (Paischer et al. 2024, "One Initialization to Rule
them All: Fine-tuning via Explained Variance Adaptation"); HF PEFT 0.21's field names and defaults.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..subconfig import for_init, register_check

logger = logging.getLogger(__name__)


@dataclass
class EvaConfig:
    """How `initialize_lora_eva_weights` computes A (the right-singular vectors of each layer's inputs).

    rho: a layer may receive up to round(r * rho) ranks (>= 1; 1 means no redistribution). tau: a component
    counts as converged once its cosine similarity with the previous step's estimate reaches tau.
    use_label_mask / label_mask_value: skip tokens whose label equals label_mask_value. whiten: divide each
    component by the square root of its singular value. adjust_scaling_factors: scale lora_alpha with the new
    rank (alpha * r_new / r).
    """

    rho: float = field(default=2.0, metadata={"help": "Max rank per layer = round(r * rho)."})
    tau: float = field(default=0.99, metadata={"help": "Cosine-similarity threshold for convergence."})
    use_label_mask: bool = field(default=True,
                                 metadata={"help": "Ignore tokens whose label is label_mask_value."})
    label_mask_value: int = field(default=-100, metadata={"help": "Label value of ignored tokens."})
    whiten: bool = field(default=False, metadata={"help": "Divide components by sqrt(singular value)."})
    adjust_scaling_factors: bool = field(default=True,
                                         metadata={"help": "alpha *= new_rank / r after redistribution."})

    def __post_init__(self) -> None:
        if self.rho < 1.0:
            raise ValueError(f"EvaConfig.rho must be >= 1.0, got {self.rho}.")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"EvaConfig.tau must be between 0.0 and 1.0, got {self.tau}.")


def check_config(config) -> None:
    """LoraConfig's `eva_config` as an EvaConfig (files hold a dict); the default one when init is 'eva'."""
    config.eva_config = for_init(config.eva_config, EvaConfig, "eva_config", config.init_lora_weights, "eva")


register_check("eva_config", check_config)
