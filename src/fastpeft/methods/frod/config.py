"""`FrodConfig`: HF PEFT 0.21's fields and defaults for FRoD (full-rank adaptation through a shared basis
and a sparse trained rotation)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig
from .._shared.common import check_choice, lists_to_sets

BIAS_CHOICES = ("none", "all", "frod_only")


@dataclass
class FrodConfig(PeftConfig):
    """Re-express each targeted weight as W = U diag(lambda) V^T (V shared by the layers of one role, built
    from all their weights) and train lambda and a sparse off-diagonal S: W' = U (S + diag(lambda)) V^T
    (https://doi.org/10.1609/aaai.v40i31.39813)."""

    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "nn.Linear / Conv1D modules to adapt: names (or dotted suffixes), a full-match regex or "
                "'all-linear'; default: the model type's row of HF PEFT's FRoD table."})
    projection_prng_key: int = field(default=0, metadata={
        "help": "Seed of the generator that picks the positions of the sparse S entries."})
    save_projection: bool = field(default=True, metadata={
        "help": "Store the shared bases V and the S positions in the adapter file (else rebuilt from the "
                "base weights and projection_prng_key on load)."})
    frod_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter's input."})
    fan_in_fan_out: bool = field(default=False, metadata={
        "help": "True for layers storing their weight (in, out) such as transformers' Conv1D."})
    bias: str = field(default="none", metadata={
        "help": "Biases trained too: 'none', 'all' (every bias of the model) or 'frod_only' (biases of the "
                "adapted layers)."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: S = 0, so W' reproduces W at start; False: S ~ N(0, 0.1^2) and lambda gets "
                "N(0, 0.1^2) noise."})
    layers_to_transform: list[int] | int | None = field(default=None,
                                                        metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    sparse_rate: float = field(default=0.01, metadata={
        "help": "Share of the in x in positions of S (off-diagonal only) that train."})
    regularization_alpha: float = field(default=1e-3, metadata={
        "help": "Ridge term added before inverting Q_i^T Q_i when the shared basis is built."})
    progressbar: bool = field(default=True, metadata={
        "help": "Show progress while the shared bases are built (one decomposition per module role)."})
    runtime_offload_base_weight: bool = field(default=False, metadata={
        "help": "HF PEFT keeps the adapted layers' base weights on the CPU while unused; not implemented "
                "here (refused when True)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        lists_to_sets(self, names=("target_modules",))
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("FrodConfig: layers_pattern needs layers_to_transform (which layer indices to "
                             "adapt).")
        rate = self.sparse_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise ValueError(f"FrodConfig.sparse_rate should be between 0 and 1, got {rate!r}.")
        check_choice("FrodConfig", "bias", self.bias, BIAS_CHOICES)
        dropout = self.frod_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
            raise ValueError(f"FrodConfig.frod_dropout must be a probability in [0, 1], got {dropout!r}.")
