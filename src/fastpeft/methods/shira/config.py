"""`ShiraConfig`: HF PEFT 0.21's fields and defaults for SHiRA, sparse high-rank adapters (Bhardwaj et al.,
2024)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ...config import PeftConfig
from .._shared.common import check_positive_ints, lists_to_sets
from .masks import random_mask

logger = logging.getLogger(__name__)


@dataclass
class ShiraConfig(PeftConfig):
    """Train a fixed sparse set of entries of each targeted weight (https://arxiv.org/abs/2406.13175).

    A (out, in) layer trains `r * (out + in)` entries (as many as a rank-r LoRA) picked by a mask: a seeded
    random one (`mask_type="random"`), or the user's `config.mask_fn(base_layer, r, **kwargs)` set after the
    config is made. The picked positions are saved with the adapter (`shira_indices`).
    """

    r: int = field(default=32, metadata={
        "size": "dim",
        "help": "Sets the trained entries per layer to r * (in + out), a rank-r LoRA's count; the update "
                "itself is not limited to rank r."})
    # a str (not a Literal): a file naming a custom mask type loads, its positions coming from the file
    mask_type: str = field(default="random", metadata={
        "help": "'random': a seeded random sparse mask. Other names: set config.mask_fn to a function "
                "(base_layer, r, **kwargs) -> 0/1 mask of the weight's (out, in) shape with r * (in + out) "
                "ones."})
    random_seed: int | None = field(default=None, metadata={
        "help": "Seed of the random mask's generator (None: torch's default generator seed)."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "nn.Linear modules to adapt: names, a full-match regex or 'all-linear'; default: the model "
                "type's attention projections."})
    fan_in_fan_out: bool = field(default=False, metadata={
        "help": "Weight stored as (in, out); only nn.Linear is supported, so it is set back to False."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: the trained entries start at zero (no change); False: N(0, 1) values (for tests)."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})

    def __post_init__(self) -> None:
        super().__post_init__()
        lists_to_sets(self, ("target_modules",))
        check_positive_ints(self, "ShiraConfig", ("r",))
        if self.mask_type == "random":
            self.mask_fn = random_mask
        else:
            if not self.inference_mode:
                logger.warning(
                    "ShiraConfig.mask_type=%r is not a built-in mask: set config.mask_fn = your_mask_fn "
                    "before get_peft_model (or load the positions from a saved adapter).", self.mask_type)
            self.mask_fn = None
