"""`VeraConfig`: HF PEFT 0.21's fields and defaults for VeRA (Kopiczko et al., 2023,
https://arxiv.org/abs/2310.11454)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig
from .._shared.common import check_layer_selection, lists_to_sets
from .._shared.random_projections import check_projection_config

VERA_BIAS = ("none", "all", "vera_only")


@dataclass
class VeraConfig(PeftConfig):
    """Vector-based Random Matrix Adaptation: W + diag(lambda_b) B diag(lambda_d) A, with A: (r, in) and
    B: (out, r) frozen random matrices shared by all layers; only the vectors lambda_b / lambda_d train."""

    r: int = field(default=256, metadata={
        "size": "dim",
        "help": "Rows of the shared random A (columns of B). Cheap: only lambda_d grows with r."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Names (exact or dotted suffixes), a full-match regex, or 'all-linear'. "
                "nn.Linear and Conv1D only."})
    projection_prng_key: int = field(default=0, metadata={
        "help": "Seed of the torch.Generator that draws the shared A and B (same for all "
                "adapters of a model)."})
    save_projection: bool = field(default=True, metadata={
        "help": "Store A and B in the adapter file (as base_model.vera_A / vera_B); False: redraw them from "
                "projection_prng_key on load (smaller files, relies on the generator being reproducible)."})
    vera_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    d_initial: float = field(default=0.1, metadata={"help": "Initial value of every entry of lambda_d."})
    fan_in_fan_out: bool = field(default=False, metadata={
        "help": "Base weight stored as (in, out), e.g. GPT-2's Conv1D (set automatically per layer type)."})
    bias: str = field(default="none", metadata={
        "help": "'none', 'all' (train every bias of the model) or 'vera_only' (biases of "
                "the adapted layers)."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: lambda_b = 0 (the adapter starts as a no-op), lambda_d = d_initial; "
                "False: random (tests)."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={
        "help": "Only adapt the layers with these indices (needs a list of names as target_modules)."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={
        "help": "Name of the nn.ModuleList holding the layers indexed by layers_to_transform "
                "(e.g. 'layers', 'h')."})

    def __post_init__(self) -> None:
        super().__post_init__()
        lists_to_sets(self, ("target_modules",), kinds=(list, tuple))
        check_projection_config(self, "VeraConfig", VERA_BIAS, dropout=self.vera_dropout)
        check_layer_selection(self, "VeraConfig")

