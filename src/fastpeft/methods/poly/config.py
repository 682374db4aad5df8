"""`PolyConfig`: the fields and defaults of HF PEFT 0.21's Poly config (all of them, so files round-trip).

Polytropon (Ponti et al., 2022, "Combining Modular Skills in Multitask Learning", arXiv:2202.13914) and its
Multi-Head Routing variant (Caccia et al., 2022, arXiv:2211.03831, `n_splits > 1`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...config import PeftConfig
from .._shared.common import check_choice, check_positive_ints, lists_to_sets

POLY_TYPES = ("poly",)


@dataclass
class PolyConfig(PeftConfig):
    """An inventory of `n_skills` low-rank modules per layer, mixed per task by a learned router."""

    r: int = field(default=8, metadata={"size": "dim", "help": "Rank of each skill's low-rank update."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names (or a full-match regex) of the nn.Linear modules to adapt."})
    exclude_modules: list[str] | str | None = field(default=None,
                                                    metadata={"help": "Names or regex to skip."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Other modules trained in full and saved with the adapter."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: skill B matrices start at zero (adapter is a no-op at init)."})
    poly_type: Literal["poly"] = field(default="poly", metadata={"help": "Router type; only 'poly' exists."})
    n_tasks: int = field(default=1, metadata={
        "size": "dim", "help": "Number of tasks (valid task_ids: 0..n_tasks-1)."})
    n_skills: int = field(default=4, metadata={
        "size": "dim", "help": "Number of skills (low-rank modules) per layer."})
    n_splits: int = field(
        default=1, metadata={
            "size": "dim", "help": "Feature splits routed separately; > 1 is Multi-Head Routing (MHR)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        lists_to_sets(self)
        self._validate()

    def _validate(self) -> None:
        check_positive_ints(self, "PolyConfig", ("r", "n_tasks", "n_skills", "n_splits"))
        check_choice("PolyConfig", "poly_type", self.poly_type, POLY_TYPES)
