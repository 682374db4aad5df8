"""`AdamssConfig`: HF PEFT 0.21's fields, defaults and checks for AdaMSS (adaptive multi-subspace fine-tuning
with ASA, adaptive subspace allocation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...config import PeftConfig
from .._shared.common import check_layer_selection, check_positive_ints, lists_to_sets


@dataclass
class AdamssConfig(PeftConfig):
    """Split each nn.Linear's output rows into k-means clusters of its top-r left singular vectors; each
    cluster trains its own low-rank update acting on the input's projection onto the top-r right singular
    vectors. ASA (`use_asa`) prunes the least important subspaces during training (`update_and_allocate`).

    r, num_subspaces and subspace_rank are clamped per layer (to the weight's sizes, the number of output
    rows and each cluster's size), as HF PEFT documents.
    """

    r: int = field(default=100, metadata={"size": "dim", "help": (
        "Rank R of the truncated SVD of each weight (clamped per layer to min(R, out, in + 1 with a "
        "bias)).")})
    num_subspaces: int = field(default=5, metadata={"size": "dim", "help": (
        "Number K of k-means clusters of output rows, each a trained subspace (clamped to the output "
        "rows).")})
    subspace_rank: int = field(default=1, metadata={"size": "dim", "help": (
        "Rank of each subspace's update (clamped to the cluster's size).")})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "nn.Linear modules to adapt: names (or dotted suffixes), a full-match regex or 'all-linear'; "
                "default: the model type's row of HF PEFT's table."})
    init_weights: Literal["orthogonal"] | None = field(default="orthogonal", metadata={
        "help": "'orthogonal': A from QR of the cluster's singular vectors, B zeros (a no-op at start); "
                "None (or False): B small Gaussian values (an adapter that acts at once)."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})
    layers_to_transform: list[int] | int | None = field(default=None,
                                                        metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    use_asa: bool = field(default=False, metadata={
        "help": "Adaptive subspace allocation: prune subspaces by importance during training (call "
                "update_and_allocate each step or use AdamssAsaCallback)."})
    asa_target_subspaces: int = field(default=50, metadata={
        "help": "Active subspaces over all layers kept once pruning ends (use_asa)."})
    init_warmup: int = field(default=50, metadata={"help": "Step at which ASA starts scoring and pruning."})
    final_warmup: int = field(default=1000, metadata={
        "help": "Step at which ASA reaches asa_target_subspaces and stops."})
    mask_interval: int = field(default=100, metadata={"help": "Steps between two ASA pruning rounds."})
    asa_importance_beta: float = field(default=0.85, metadata={
        "help": "EMA coefficient of the importance |w * grad|."})
    asa_uncertainty_beta: float = field(default=0.85, metadata={
        "help": "EMA coefficient of the importance's deviation (uncertainty)."})
    asa_schedule_exponent: float = field(default=3.0, metadata={
        "help": "Exponent of the decay from all subspaces to asa_target_subspaces (1: linear)."})
    use_dynamic_rank: bool = field(default=False, metadata={
        "help": "Each subspace's rank from its singular values above svd_threshold (at most subspace_rank)."})
    svd_threshold: float = field(default=0.1, metadata={
        "help": "use_dynamic_rank: singular values above this fraction of the largest count."})
    random_seed: int = field(default=0, metadata={
        "help": "Seed of the randomised SVD, so that a load rebuilds the same subspaces."})

    def __post_init__(self) -> None:
        super().__post_init__()
        lists_to_sets(self, ("target_modules",))
        check_layer_selection(self, "AdamssConfig")
        if self.init_weights is False:  # as HF PEFT: False stands for None
            self.init_weights = None
        if self.init_weights not in ("orthogonal", None):
            raise ValueError(f"AdamssConfig.init_weights must be 'orthogonal' or None, got "
                             f"{self.init_weights!r}.")
        # HF PEFT leaves these unchecked: 0 fails deep inside the SVD / k-means, or (subspace_rank) silently
        # means 1
        check_positive_ints(self, "AdamssConfig", ("r", "num_subspaces", "subspace_rank"))
        if self.use_asa:
            self._check_asa()

    def _check_asa(self) -> None:
        if self.mask_interval <= 0:
            raise ValueError(f"AdamssConfig.mask_interval must be a positive integer when use_asa=True, got "
                             f"{self.mask_interval}.")
        if self.init_warmup >= self.final_warmup:
            raise ValueError(f"AdamssConfig.init_warmup ({self.init_warmup}) must be smaller than "
                             f"final_warmup ({self.final_warmup}) when use_asa=True: ASA prunes between the "
                             "two.")
        if self.asa_target_subspaces <= 0:
            raise ValueError(f"AdamssConfig.asa_target_subspaces must be a positive integer when "
                             f"use_asa=True, got {self.asa_target_subspaces}.")
        if self.asa_schedule_exponent <= 0:
            raise ValueError(f"AdamssConfig.asa_schedule_exponent must be positive when use_asa=True, got "
                             f"{self.asa_schedule_exponent}.")
