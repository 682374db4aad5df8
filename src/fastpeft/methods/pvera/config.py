"""`PveraConfig`: HF PEFT 0.21's fields and defaults for PVeRA, probabilistic vector-based random matrix
adaptation (https://arxiv.org/abs/2512.07703)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig
from .._shared.common import check_layer_selection, lists_to_sets
from .._shared.random_projections import check_projection_config

PVERA_BIAS = ("none", "all", "pvera_only")


@dataclass
class PveraConfig(PeftConfig):
    """VeRA made probabilistic: the frozen shared A: (2r, in) maps the input to the mean and log-variance
    of an r-dimensional latent (each scaled by the trained lambda_d: (2r,)), a sample of it (the mean in
    eval mode, unless `sample_at_inference`) goes through the frozen shared B: (out, r), scaled by the
    trained lambda_b: (out,)."""

    r: int = field(default=256, metadata={
        "size": "dim",
        "help": "Size of the latent: the shared A has 2r rows (mean and log-variance), B has r columns. "
                "Cheap: only lambda_d (2r entries) grows with r."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Names (exact or dotted suffixes), a full-match regex, or 'all-linear'. nn.Linear and "
                "transformers' Conv1D only; None: the model type's default targets."})
    projection_prng_key: int = field(default=0, metadata={
        "help": "Seed of the CPU torch.Generator drawing the shared A and B (one pair for all adapters of "
                "a model)."})
    save_projection: bool = field(default=True, metadata={
        "help": "Store A and B in the adapter file (base_model.pvera_A / pvera_B); False: draw them again "
                "from projection_prng_key on load (smaller files, relies on the generator's "
                "reproducibility)."})
    pvera_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    d_initial: float = field(default=0.1, metadata={
        "help": "Initial value of every entry of lambda_d (small values, <= 0.1, are advised)."})
    fan_in_fan_out: bool = field(default=False, metadata={
        "help": "Base weight stored as (in, out), as GPT-2's Conv1D (set per layer type automatically)."})
    bias: str = field(default="none", metadata={
        "help": "'none', 'all' (train every bias of the model) or 'pvera_only' (biases of the adapted "
                "layers); trained biases change the output even with the adapter disabled."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: lambda_b = 0 (a no-op at start), lambda_d = d_initial; False: lambda_b = 1, "
                "lambda_d standard normal (tests)."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={
        "help": "Only adapt the layers with these indices (read from the list named by layers_pattern)."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={
        "help": "Name of the nn.ModuleList whose indices layers_to_transform gives (e.g. 'layers', 'h')."})
    sample_at_inference: bool = field(default=False, metadata={
        "help": "Also sample the latent in eval mode; False: eval mode uses its mean (deterministic, the "
                "form merging gives)."})
    generator_seed: int | None = field(default=None, metadata={
        "help": "Seed of a per-adapter CPU generator for the latent's noise; None: torch's global RNG "
                "(which activation checkpointing replays)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        lists_to_sets(self, ("target_modules",))
        check_projection_config(self, "PveraConfig", PVERA_BIAS, dropout=self.pvera_dropout)
        check_layer_selection(self, "PveraConfig")
        seed = self.generator_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"PveraConfig.generator_seed must be an int or None, got {seed!r}.")
