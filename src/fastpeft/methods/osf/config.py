"""`OSFConfig`: HF PEFT 0.21's fields and defaults for OSF, orthogonal subspace fine-tuning (Nayak et al.,
2025)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig


def check_rank_value(owner: str, value) -> None:
    """An effective rank is None (half the layer), a positive int (singular directions kept frozen) or a
    positive float (in (0, 1]: a fraction of the layer's smaller size; above 1: truncated to an int)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{owner} must be None, a positive integer or a fraction in (0, 1], got {value!r}.")


@dataclass
class OSFConfig(PeftConfig):
    """Fine-tune only the low singular directions of each weight, with gradients kept orthogonal to the frozen
    top-`effective_rank` subspace (https://arxiv.org/abs/2504.07097).

    A (out, in) weight W = U S V^T is split at k = effective_rank: the top k singular triplets stay frozen,
    the remaining min(out, in) - k (U_low, S_low, V_low) train. Sizes are resolved per layer: None = half the
    smaller size, a float in (0, 1] = that fraction of it.
    """

    effective_rank: int | float | None = field(default=None, metadata={
        "help": "Singular directions kept frozen per layer (int), or a fraction in (0, 1] of the layer's "
                "smaller size; None: half of it. The trained rank is min(out, in) - effective_rank."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "nn.Linear modules to adapt: names (or dotted suffixes), a full-match regex or 'all-linear'; "
                "default: the model type's table, else every linear layer but the output head."})
    rank_pattern: dict | None = field(default=None, metadata={
        "help": "Regex (searched anywhere in the module name; the first match wins) -> effective_rank for "
                "the matching layers, with the same int / fraction rules."})
    init_weights: bool | None = field(default=True, metadata={
        "help": "True: the trained factors start as the weight's low singular triplets (no change at start); "
                "False: they start random (the update is not zero)."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})
    target_svd_config: dict | None = field(default=None, metadata={
        "help": "Parameter name -> rank; accepted and stored, not used (as HF PEFT 0.21)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rank_value("OSFConfig.effective_rank", self.effective_rank)
        if self.rank_pattern is not None:
            if not isinstance(self.rank_pattern, dict):
                raise ValueError("OSFConfig.rank_pattern must be a dict {module regex: effective_rank}, got "
                                 f"{self.rank_pattern!r}.")
            for key, value in self.rank_pattern.items():
                check_rank_value(f"OSFConfig.rank_pattern[{key!r}]", value)
        if self.target_svd_config is not None and not isinstance(self.target_svd_config, dict):
            raise ValueError(f"OSFConfig.target_svd_config must be a dict or None, got "
                             f"{self.target_svd_config!r}.")
