"""`RandLoraConfig`: HF PEFT 0.21's fields and defaults for RandLoRA (Albert et al., 2025,
https://arxiv.org/abs/2502.00987)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig
from .._shared.common import lists_to_sets
from .._shared.random_projections import check_projection_config

RANDLORA_BIAS = ("none", "all", "randlora_only")


@dataclass
class RandLoraConfig(PeftConfig):
    """Full-rank updates from shared frozen random low-rank bases: sum_i B_i diag(lambda_i) A diag(gamma_i),
    with only the small lambda / gamma scalings trained per layer."""

    r: int = field(default=32, metadata={
        "size": "dim",
        "help": "Rank of each random basis. Layers use ceil(min(in, out) / r) bases, so a SMALLER r trains "
                "more parameters."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Names (exact or dotted suffixes), a full-match regex, or 'all-linear'. "
                "nn.Linear and Conv1D only."})
    projection_prng_key: int = field(default=0, metadata={
        "help": "Seed of the torch.Generator that draws the shared bases (same for all "
                "adapters of a model)."})
    save_projection: bool = field(default=True, metadata={
        "help": "Store the bases in the adapter file (base_model.randlora_A / randlora_B, plus a copy per "
                "layer as HF PEFT writes); False: redraw them from projection_prng_key on load."})
    sparse: bool = field(default=False, metadata={
        "help": "Ternary bases: -1 / +1 with probability 1/6 each, 0 otherwise (then scaled to unit std)."})
    very_sparse: bool = field(default=False, metadata={
        "help": "Sparser ternary bases: -1 / +1 with probability 1/(2 sqrt(D)) each, D the smaller dimension "
                "of the largest target (overrides sparse)."})
    randlora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    fan_in_fan_out: bool = field(default=False, metadata={
        "help": "Base weight stored as (in, out), e.g. GPT-2's Conv1D (set automatically per layer type)."})
    randlora_alpha: int = field(default=640, metadata={
        "help": "Scaling numerator: updates are multiplied by randlora_alpha / r (typically 20 * r). Large "
                "values may need a smaller learning rate."})
    bias: str = field(default="none", metadata={
        "help": "'none', 'all' (train every bias of the model) or 'randlora_only' (biases of "
                "the adapted layers)."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: lambda = 0 (the adapter starts as a no-op); False: random lambda (for tests)."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={
        "help": "Only adapt the layers with these indices (needs a list of names as target_modules)."})
    layers_pattern: str | None = field(default=None, metadata={
        "help": "Name of the nn.ModuleList holding the layers indexed by layers_to_transform "
                "(e.g. 'layers', 'h')."})

    def __post_init__(self) -> None:
        super().__post_init__()
        lists_to_sets(self, ("target_modules",), kinds=(list, tuple))
        check_projection_config(self, "RandLoraConfig", RANDLORA_BIAS, dropout=self.randlora_dropout)
