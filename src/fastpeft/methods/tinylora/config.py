"""`TinyLoraConfig`: HF PEFT 0.21's fields and defaults for TinyLoRA ("Learning to Reason in 13 Parameters",
https://arxiv.org/abs/2602.04118)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ...config import PeftConfig
from .._shared.common import check_choice, check_layer_selection, check_positive_ints, lists_to_sets

logger = logging.getLogger(__name__)

TINYLORA_BIAS = ("none", "all", "tinylora_only")


@dataclass
class TinyLoraConfig(PeftConfig):
    """Each adapted weight W gets dW = B R A: A (r, in) and B (out, r) are the frozen top-r SVD factors of W
    (sqrt of the singular values on each side), R (r, r) = sum_i v[i] P[i] with frozen seeded P (u, r, r)
    per layer and a trained v (u,) that `weight_tying` shares between groups of layers."""

    r: int = field(default=2, metadata={
        "size": "dim",
        "help": "Rank of the frozen SVD factors (the paper uses 2); a layer with fewer rows or columns uses "
                "min(out, in)."})
    u: int = field(default=64, metadata={
        "size": "matrix",
        "help": "Length of each trained vector v (the number of random r x r matrices P it combines)."})
    weight_tying: float = field(default=0.0, metadata={
        "help": "Share of layers tied to one v, in [0, 1]: 0 gives each adapted layer its own v, 1 one v "
                "for all; in between, round(n * (1 - weight_tying)) groups of consecutive layers."})
    projection_seed: int = field(default=42, metadata={
        "help": "Seed of the frozen P: layer number i (in module order) draws from projection_seed + i."})
    save_projection: bool = field(default=True, metadata={
        "help": "Store every layer's P in the adapter file; False: P is drawn again from projection_seed "
                "on load (smaller files, relying on the generator's reproducibility)."})
    init_v_bound: float = field(default=0.02, metadata={
        "help": "init_weights='uniform' draws v from U(-init_v_bound, init_v_bound)."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Names (exact or dotted suffixes), a full-match regex or 'all-linear'. nn.Linear, "
                "nn.Embedding and transformers' Conv1D; None: the model type's default targets."})
    tinylora_dropout: float = field(default=0.0, metadata={
        "help": "Dropout on the adapter's input (on the looked-up rows of B for embeddings)."})
    fan_in_fan_out: bool = field(default=False, metadata={
        "help": "Base weight stored as (in, out), as GPT-2's Conv1D (set per layer type automatically)."})
    bias: str = field(default="none", metadata={
        "help": "'none', 'all' (train every bias of the model) or 'tinylora_only' (biases of the adapted "
                "layers)."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})
    init_weights: bool | str = field(default=True, metadata={
        "help": "True: v = 0 (the adapter starts as a no-op); 'uniform': v ~ U(-init_v_bound, "
                "init_v_bound); False: v left unset (HF PEFT leaves memory as it is, fastpeft zeros)."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={
        "help": "Only adapt the layers with these indices (read from the list named by layers_pattern)."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={
        "help": "Name of the nn.ModuleList whose indices layers_to_transform gives (e.g. 'layers', 'h')."})

    def __post_init__(self) -> None:
        super().__post_init__()
        lists_to_sets(self, ("target_modules",))
        check_layer_selection(self, "TinyLoraConfig")
        if not self.save_projection:
            logger.warning("TinyLoraConfig.save_projection=False: the projections P are not saved and will "
                           "be drawn again from projection_seed on load; set save_projection=True to make "
                           "files self-contained.")
        check_positive_ints(self, "TinyLoraConfig", ("r", "u"))
        tying = self.weight_tying
        if isinstance(tying, bool) or not isinstance(tying, (int, float)) or not 0.0 <= tying <= 1.0:
            raise ValueError(f"TinyLoraConfig.weight_tying must be a number in [0, 1], got {tying!r}.")
        dropout = self.tinylora_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"TinyLoraConfig.tinylora_dropout must be in [0, 1), got {dropout!r}.")
        check_choice("TinyLoraConfig", "bias", self.bias, TINYLORA_BIAS)
        if not (isinstance(self.init_weights, bool) or self.init_weights == "uniform"):
            raise ValueError(f"TinyLoraConfig.init_weights must be True, False or 'uniform', got "
                             f"{self.init_weights!r}.")
