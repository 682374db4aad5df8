"""`DeftConfig`: HF PEFT 0.21's fields and defaults for DEFT, decompositional efficient fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...config import PeftConfig
from .._shared.common import check_choice, check_layer_options, check_positive_ints

DECOMPOSITIONS = ("relu", "qr")


@dataclass
class DeftConfig(PeftConfig):
    """DEFT: replace an r-dimensional subspace of each weight's output space with trained content.

    For a weight W (out, in), a trained direction P (out, r) and injection R (r, in), the adapted weight is
    (I - P_proj) W + s Q_P R with P_proj = Q_P right^T: `relu` takes Q_P = P, right = relu(P); `qr` takes the
    orthonormal Q_P of P for both. `para=True` drops the injection (PaRa: pure subspace removal).
    """

    r: int = field(default=8, metadata={
        "size": "dim",
        "help": "Rank of the projection P and injection R (capped at each layer's out_features)."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "nn.Linear / transformers Conv1D modules to adapt: names (or dotted suffixes), a full-match "
                "regex or 'all-linear'; default: the model type's LoRA targets."})
    exclude_modules: list[str] | str | None = field(default=None,
                                                    metadata={"help": "Names or regex to skip."})
    decomposition_method: Literal["relu", "qr"] = field(default="relu", metadata={
        "help": "How the projector comes from P: 'relu' (P relu(P)^T, not orthogonal) or 'qr' (Q Q^T, Q the "
                "orthonormal factor of P)."})
    init_scale: float = field(default=1.0, metadata={
        "help": "Multiplies the std (0.02) of R's random init (init_weights=False only)."})
    alpha: int | None = field(default=None, metadata={
        "help": "The injection is scaled by alpha / r (as LoRA's alpha); None: no scaling. The removal "
                "term is never scaled."})
    para: bool = field(default=False, metadata={
        "help": "PaRa: pure subspace removal (the update is -P_proj W), no R; never an identity at init."})
    fan_in_fan_out: bool = field(default=False, metadata={
        "help": "Base weight stored as (in, out), as transformers' Conv1D (corrected per layer type)."})
    deft_dropout: float = field(default=0.0, metadata={"help": "Dropout on the injection's input."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: R = right^T W / scale, so the adapter is a no-op at start; False: R normal with std "
                "0.02 * init_scale."})
    layers_to_transform: list[int] | int | None = field(default=None,
                                                        metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    bias: str = field(default="none", metadata={
        "help": "Biases trained too: 'none', 'all' (every bias) or 'deft_only' (those of adapted layers)."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "DeftConfig", ("r",))
        check_choice("DeftConfig", "decomposition_method", self.decomposition_method, DECOMPOSITIONS)
        check_layer_options(self, "DeftConfig")
        dropout = self.deft_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
            raise ValueError(f"DeftConfig.deft_dropout must be in [0, 1], got {dropout!r}.")
