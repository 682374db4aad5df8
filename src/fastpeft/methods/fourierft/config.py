"""`FourierFTConfig`: HF PEFT 0.21's fields and defaults for FourierFT (Gao et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig
from .._shared.common import check_choice, check_layer_selection, lists_to_sets

BIAS_CHOICES = ("none", "all", "fourier_only")


@dataclass
class FourierFTConfig(PeftConfig):
    """FourierFT: learn `n_frequency` spectral coefficients of each weight change
    (https://arxiv.org/abs/2405.03003).

    The change of a (out, in) weight is `scaling * Re(IFFT2(S))`, where S is zero except at `n_frequency`
    entries drawn once from `random_loc_seed`; those entries (`fourierft_spectrum`) are what is trained and
    saved.
    """

    n_frequency: int = field(default=1000, metadata={
        "size": "matrix",
        "help": "Trainable spectral coefficients per adapted layer; at most in_features * out_features."})
    scaling: float = field(default=150.0, metadata={
        "help": "Multiplier of the inverse FFT (plays the role of LoRA's alpha / r)."})
    random_loc_seed: int | None = field(default=777, metadata={
        "help": "Seed of the random spectral locations (same seed -> same locations as HF PEFT)."})
    fan_in_fan_out: bool = field(default=False, metadata={
        "help": "Base weight stored as (in, out), e.g. transformers' Conv1D (set "
                "automatically per layer type)."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Names (or dotted suffixes), a full-match regex, or 'all-linear'; default "
                "from the model type."})
    exclude_modules: list[str] | str | None = field(default=None,
                                                    metadata={"help": "Names or regex to skip."})
    bias: str = field(default="none",
                      metadata={"help": "Biases trained too: 'none', 'all' or 'fourier_only'."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})
    layers_to_transform: list[int] | int | None = field(default=None,
                                                        metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    n_frequency_pattern: dict | None = field(default_factory=dict, metadata={
        "help": "Module-name regex -> n_frequency for layers that differ from `n_frequency`."})
    init_weights: bool = field(default=False, metadata={
        "help": "False: spectrum ~ N(0, 1) (as the paper); True: zeros (the adapter starts as a no-op)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        lists_to_sets(self)
        self.n_frequency_pattern = self.n_frequency_pattern or {}
        self._validate()

    def _validate(self) -> None:
        check_layer_selection(self, "FourierFTConfig", regex_targets=True)
        check_choice("FourierFTConfig", "bias", self.bias, BIAS_CHOICES)
        if not isinstance(self.n_frequency_pattern, dict):
            raise ValueError("FourierFTConfig.n_frequency_pattern must be a dict {module regex: "
                             f"n_frequency}}, got {self.n_frequency_pattern!r}.")
