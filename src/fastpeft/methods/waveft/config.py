"""`WaveFTConfig`: HF PEFT 0.21's fields and defaults for WaveFT (Bilican et al., 2025)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig
from .._shared.common import check_layer_options
from .wavelets import ACCEPTED_BY_HF, check_wavelet


@dataclass
class WaveFTConfig(PeftConfig):
    """WaveFT: learn `n_frequency` coefficients of each weight change in a 2-D wavelet domain
    (https://arxiv.org/abs/2505.12532).

    The change of an (out, in) weight is `scaling * IDWT2(C)`, where C is zero except at `n_frequency`
    positions drawn once from `random_loc_seed`; those entries (`waveft_spectrum`) are trained and saved.
    """

    n_frequency: int = field(default=2592, metadata={
        "size": "matrix",
        "help": "Trainable wavelet coefficients per adapted layer; at most in_features * out_features."})
    scaling: float = field(default=25.0, metadata={
        "help": "Multiplier of the reconstructed weight change (plays the role of LoRA's alpha)."})
    wavelet_family: str = field(default="db1", metadata={
        "help": "Wavelet of the inverse transform: db1 (Haar, default) to db10, sym2 to sym10, coif1."})
    use_idwt: bool = field(default=True, metadata={
        "help": "True: the coefficients go through the inverse wavelet transform; False: they are the "
                "sparse weight change itself."})
    random_loc_seed: int = field(default=777, metadata={
        "help": "Seed of the coefficients' random positions (same seed -> same positions as HF PEFT)."})
    fan_in_fan_out: bool = field(default=False, metadata={
        "help": "Base weight stored as (in, out), e.g. transformers' Conv1D (set automatically per layer "
                "type)."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Names (or dotted suffixes), a full-match regex, or 'all-linear'; default from the model "
                "type."})
    exclude_modules: list[str] | str | None = field(default=None,
                                                    metadata={"help": "Names or regex to skip."})
    bias: str = field(default="none",
                      metadata={"help": "Biases trained too: 'none', 'all' or 'waveft_only'."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})
    layers_to_transform: list[int] | int | None = field(default=None,
                                                        metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    n_frequency_pattern: dict | None = field(default_factory=dict, metadata={
        "help": "Module-name regex -> n_frequency for layers that differ from `n_frequency`."})
    proportional_parameters: bool = field(default=False, metadata={
        "help": "True: the budget n_frequency * (number of targets) is shared in proportion to each "
                "layer's in_features * out_features (at least 1 each); n_frequency_pattern is then unused."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: coefficients start at zero (identity); False: N(0, 0.01^2)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.n_frequency_pattern = self.n_frequency_pattern or {}
        check_layer_options(self, "WaveFTConfig")
        if self.wavelet_family not in ACCEPTED_BY_HF:
            raise ValueError(f"Wavelet family {self.wavelet_family!r} not supported; HF PEFT accepts "
                             f"{list(ACCEPTED_BY_HF)}.")
        check_wavelet(self.wavelet_family)
        if not isinstance(self.n_frequency_pattern, dict):
            raise ValueError("WaveFTConfig.n_frequency_pattern must be a dict {module regex: n_frequency}, "
                             f"got {self.n_frequency_pattern!r}.")
