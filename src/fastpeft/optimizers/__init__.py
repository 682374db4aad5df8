"""Optimizers tailored to LoRA adapters, mirroring HF PEFT's `peft.optimizers`.

LoRA+ (Hayou et al. 2024) in `loraplus`; LoRA-FA (Zhang et al. 2023) in `lorafa`.
"""

from .lorafa import LoraFAOptimizer, create_lorafa_optimizer
from .loraplus import create_loraplus_optimizer

__all__ = ["LoraFAOptimizer", "create_lorafa_optimizer", "create_loraplus_optimizer"]
