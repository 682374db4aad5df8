"""`UniLoraConfig`: HF PEFT 0.21's fields and defaults for Uni-LoRA (Li et al., 2025)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig
from .._shared.common import check_choice, check_positive_ints, lists_to_sets

BIAS_CHOICES = ("none", "all", "unilora_only")


@dataclass
class UniLoraConfig(PeftConfig):
    """Uni-LoRA: every entry of every layer's LoRA factors A (r, in) and B (out, r) is one entry of a single
    trained vector `theta_d` (length `theta_d_length`), picked by a fixed seeded index and scaled by
    1/sqrt(how many entries share it) ("One Vector Is All You Need", https://arxiv.org/abs/2506.00799)."""

    r: int = field(default=4, metadata={"size": "dim", "help": "Rank of each layer's update B @ A."})
    proj_seed: int = field(default=42, metadata={
        "help": "Seed of the fixed assignment of factor entries to entries of theta_d (files without "
                "saved indices are rebuilt from it)."})
    theta_d_length: int = field(default=256, metadata={
        "size": "matrix",
        "help": "Length of the one trained vector theta_d shared by every adapted layer."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "nn.Linear / transformers Conv1D modules to adapt: names (or dotted suffixes), a full-match "
                "regex or 'all-linear'; default: the model type's LoRA targets."})
    unilora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    fan_in_fan_out: bool = field(default=False, metadata={
        "help": "Base weight stored as (in, out), as transformers' Conv1D (corrected per layer type)."})
    bias: str = field(default="none", metadata={
        "help": "Biases trained too: 'none', 'all' (every bias) or 'unilora_only' (those of adapted "
                "layers)."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})
    init_theta_d_bound: float = field(default=0.02, metadata={
        "help": "theta_d starts uniform in [-bound, bound] (with init_weights)."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: theta_d uniform in [-init_theta_d_bound, init_theta_d_bound]; False: standard "
                "normal."})
    save_indices: bool = field(default=False, metadata={
        "help": "Also save every layer's index and scale tensors (bigger files that do not depend on the "
                "index generator); otherwise they are rebuilt from proj_seed on load."})
    layers_to_transform: list[int] | int | None = field(default=None,
                                                        metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})

    def __post_init__(self) -> None:
        super().__post_init__()
        lists_to_sets(self, ("target_modules",))
        check_positive_ints(self, "UniLoraConfig", ("r", "theta_d_length"))
        dropout = self.unilora_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
            raise ValueError(f"UniLoraConfig.unilora_dropout must be in [0, 1], got {dropout!r}.")
        bound = self.init_theta_d_bound
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or bound <= 0:
            raise ValueError(f"UniLoraConfig.init_theta_d_bound must be a positive number, got {bound!r}.")
        check_choice("UniLoraConfig", "bias", self.bias, BIAS_CHOICES)
        if isinstance(self.target_modules, str):
            for option in ("layers_to_transform", "layers_pattern"):
                if getattr(self, option) is not None:
                    raise ValueError(f"UniLoraConfig: {option} cannot be used when target_modules is a regex "
                                     "string; give target_modules as a list of names.")
