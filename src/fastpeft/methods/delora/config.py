"""`DeloraConfig`: HF PEFT 0.21's fields and defaults for DeLoRA, decoupled low-rank adaptation (Bini et al.,
2025)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...config import PeftConfig
from .._shared.common import check_layer_options, check_positive_ints


@dataclass
class DeloraConfig(PeftConfig):
    """Add a rank-r update whose Frobenius norm is bounded by a trained `delora_lambda`
    (https://arxiv.org/abs/2503.18225).

    The update of a (out, in) weight W is B diag(lambda / r / (|a_i| |b_i|)) A, its columns scaled by the
    column norms of W taken when the adapter is created (saved with the adapter).
    """

    r: int = field(default=8, metadata={"size": "dim", "help": "Rank of the update."})
    delora_lambda: int = field(default=15, metadata={
        "help": "Initial value of the trained bound on the update's norm (keeps the model near the base)."})
    module_dropout: float = field(default=0.0, metadata={
        "help": "Dropout probability on the adapter's input (training mode only)."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "nn.Linear modules to adapt: names (or dotted suffixes), a full-match regex or 'all-linear'; "
                "default: the model type's attention projections."})
    exclude_modules: list[str] | str | None = field(default=None,
                                                    metadata={"help": "Names or regex to skip."})
    bias: Literal["none", "all", "delora_only"] = field(default="none", metadata={
        "help": "Biases trained too: 'none', 'all' (every bias of the model) or 'delora_only' (biases of the "
                "adapted layers)."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: A Kaiming-uniform, B zeros (a no-op at start); False: both Kaiming-uniform."})
    layers_to_transform: list[int] | int | None = field(default=None,
                                                        metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    rank_pattern: dict | None = field(default_factory=dict, metadata={
        "size": "dim_values", "keys": "modules", "help": "Module regex -> rank overrides."})
    lambda_pattern: dict | None = field(default_factory=dict, metadata={
        "keys": "modules", "help": "Module regex -> delora_lambda overrides."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "DeloraConfig", ("r",))
        check_layer_options(self, "DeloraConfig")
        self.rank_pattern = self.rank_pattern or {}
        self.lambda_pattern = self.lambda_pattern or {}
        for option in ("rank_pattern", "lambda_pattern"):
            if not isinstance(getattr(self, option), dict):
                raise ValueError(f"DeloraConfig.{option} must be a dict {{module regex: value}}, got "
                                 f"{getattr(self, option)!r}.")
        dropout = self.module_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
            raise ValueError(f"DeloraConfig.module_dropout must be a probability in [0, 1], got {dropout!r}.")
