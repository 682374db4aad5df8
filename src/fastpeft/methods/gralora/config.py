"""`GraloraConfig`: HF PEFT 0.21's fields and defaults for GraLoRA, granular low-rank adaptation (Jung et al.,
2025, https://arxiv.org/abs/2505.20355)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig
from .._shared.common import BIAS_HELP, check_layer_selection, lists_to_sets


@dataclass
class GraloraConfig(PeftConfig):
    """Split each targeted weight into a gralora_k x gralora_k grid of blocks, each with its own rank
    r / gralora_k update; optionally add a plain rank-hybrid_r LoRA update over the whole weight."""

    r: int = field(default=32, metadata={
        "size": "dim",
        "help": "Total GraLoRA rank; the adapter has as many parameters as a rank-r LoRA. Each of the "
                "gralora_k**2 blocks gets rank r / gralora_k, so r must be a multiple of gralora_k."})
    hybrid_r: int = field(default=0, metadata={
        "size": "dim",
        "help": "Rank of an extra plain LoRA update over the whole weight (Hybrid GraLoRA); 0: none."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "nn.Linear / transformers Conv1D modules to adapt: names, a full-match regex or "
                "'all-linear'; default: the model type's attention projections."})
    alpha: int = field(default=64, metadata={
        "help": "Scale numerator: the update is multiplied by alpha / (r + hybrid_r)."})
    gralora_dropout: float = field(default=0.0, metadata={
        "help": "Dropout probability on the adapter's input."})
    gralora_k: int = field(default=2, metadata={
        "size": "dim",
        "help": "Blocks per side of the grid: each layer's in and out features must be multiples of it "
                "(2 suits r <= 32, 4 suits r >= 64)."})
    fan_in_fan_out: bool = field(default=False, metadata={
        "help": "Base weight stored as (in, out), e.g. transformers' Conv1D (set automatically per layer "
                "type)."})
    bias: str = field(default="none", metadata={
        "help": f"Biases trained too: {BIAS_HELP}, e.g. 'gralora_only'."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: the B factors start at zero (the adapter starts as a no-op); False: random B too."})
    layers_to_transform: list[int] | int | None = field(default=None,
                                                        metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})

    def __post_init__(self) -> None:
        super().__post_init__()
        lists_to_sets(self, ("target_modules",))  # HF PEFT's GraLoRA has no exclude_modules
        check_layer_selection(self, "GraloraConfig", regex_targets=True)
        self._check_sizes()
        bias = self.bias
        if not isinstance(bias, str) or not (bias in ("none", "all") or bias.endswith("_only")):
            raise ValueError(f"GraloraConfig.bias={self.bias!r} is not valid; use {BIAS_HELP}.")

    def _check_sizes(self) -> None:
        for name, lowest in (("r", 1), ("hybrid_r", 0), ("gralora_k", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
                kind = "a positive" if lowest else "a non-negative"
                raise ValueError(f"GraloraConfig.{name} must be {kind} integer, got {value!r}.")
        if self.r % self.gralora_k:
            raise ValueError(f"GraloraConfig: r={self.r} must be a multiple of gralora_k={self.gralora_k} "
                             "(each of the gralora_k blocks of a row gets rank r / gralora_k).")
