"""`RoadConfig`: HF PEFT 0.21's fields and defaults for RoAd, 2D rotary adaptation (Liao et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig
from .._shared.common import check_choice, check_positive_ints, lists_to_sets

# how many (angle, scale) pairs each output feature gets: road_1 shares one per rotated pair of features,
# road_2 has one per feature, road_4 two per feature (separate ones for the diagonal and the cross term)
VARIANTS = ("road_1", "road_2", "road_4")


@dataclass
class RoadConfig(PeftConfig):
    """Rotate pairs of each targeted nn.Linear's output features by learned, scaled 2x2 rotations
    (https://arxiv.org/abs/2409.00119).

    The outputs are cut into groups of `group_size`; feature k of a group is paired with feature
    k + group_size / 2. The adapter only stores angles and scales, so it is applied with elementwise products
    and many adapters can serve one batch, one per row (`adapter_names`).
    """

    variant: str = field(default="road_1", metadata={
        "help": "'road_1': one angle and scale per rotated pair (out / 2 numbers each); 'road_2': one per "
                "output feature (out); 'road_4': separate ones for the diagonal and cross terms (2 out)."})
    group_size: int = field(default=64, metadata={
        "size": "dim",
        "help": "Size of the feature groups whose two halves are paired for rotation; even, and it must "
                "divide the output size of every adapted layer (small models need a smaller value). It does "
                "not change what the adapter can learn, only the memory layout for serving."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: angles 0 and scales 1 (the adapter starts as a no-op); False: angles ~ N(0, 0.5), "
                "scales ~ N(1, 0.5) (for tests)."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "nn.Linear modules to adapt: names (or dotted suffixes), a full-match regex or 'all-linear'; "
                "default: the model type's attention projections."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})

    def __post_init__(self) -> None:
        super().__post_init__()
        lists_to_sets(self, ("target_modules",))
        check_choice("RoadConfig", "variant", self.variant, VARIANTS)
        check_positive_ints(self, "RoadConfig", ("group_size",))
        if self.group_size % 2:
            raise ValueError(f"RoadConfig.group_size must be even (its two halves are paired), got "
                             f"{self.group_size}.")
