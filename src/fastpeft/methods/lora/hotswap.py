"""LoRA's hot-swap rules (registered in LoRA's MethodSpec; fastpeft/hotswap.py applies them)."""

from __future__ import annotations

from ...core import targeting
from ...hotswap import SwapRule
from .config import lora_scaling


def _settings(config, key: str) -> dict[str, float]:
    """r, alpha and scaling of the module `key` under `config` (rank / alpha patterns applied)."""
    r = targeting.pattern_value(config.rank_pattern, key, config.r)
    alpha = targeting.pattern_value(config.alpha_pattern, key, config.lora_alpha)
    return {"r": r, "lora_alpha": alpha, "scaling": lora_scaling(alpha, r, config.use_rslora)}


RULES = SwapRule(
    config_keys=(("use_rslora", "the adapters compute their scaling differently"),
                 ("lora_dropout", "training behaviour would differ"),
                 ("alpha_pattern", "per-module scalings are defined differently"),
                 ("use_dora", "DoRA adds magnitude vectors a plain LoRA lacks"),
                 ("bias", "the adapters train different base biases")),
    # A (r, in...) holds the rank in dim 0, B (out, r, ...) in dim 1
    rank_dims={"lora_A": 0, "lora_embedding_A": 0, "lora_B": 1, "lora_embedding_B": 1},
    settings=_settings,
    compiled_settings=("scaling",),  # read in forward: a 0-dim tensor after prepare, so no recompilation
)
