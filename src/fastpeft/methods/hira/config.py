"""`HiraConfig`: HF PEFT 0.21's fields and defaults for HiRA, Hadamard high-rank adaptation (Huang et al.,
ICLR 2025, https://openreview.net/pdf?id=TwJrTz9cRS)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...config import PeftConfig
from .._shared.common import check_positive_ints, lists_to_sets


def init_choice(value) -> bool:
    """True for the values HF PEFT 0.21 initialises with: True, False, None (random, as False) and
    'gaussian' in any letter case."""
    if value is None or isinstance(value, bool):
        return True
    return isinstance(value, str) and value.lower() == "gaussian"


@dataclass
class HiraConfig(PeftConfig):
    """Modulate each targeted weight W0 elementwise by a rank-r product: W0 + W0 * (B A) (Hadamard product).

    The update W0 * (B A) can have a rank well above r while only A (r, in) and B (out, r) train. Targets:
    nn.Linear, transformers' Conv1D, nn.Embedding, nn.Conv1d / Conv2d / Conv3d (groups=1) and bitsandbytes
    4 / 8-bit linear layers.
    """

    r: int = field(default=32, metadata={
        "size": "dim", "help": "Rank of the factors A (r, in) and B (out, r) whose product modulates W0."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Modules to adapt: names (or dotted suffixes), a full-match regex or 'all-linear' (nn.Linear "
                "and Conv1D layers, the output head left out); default: the model type's attention "
                "projections."})
    exclude_modules: list[str] | str | None = field(default=None,
                                                    metadata={"help": "Names or regex to skip."})
    hira_dropout: float = field(default=0.0, metadata={
        "help": "Dropout probability on the adapter's input (linear and convolution layers, training mode)."})
    fan_in_fan_out: bool = field(default=False, metadata={
        "help": "True when the layer stores its weight (in, out) as GPT-2's Conv1D does; set per layer type "
                "(with a warning) when it does not fit."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})
    init_weights: bool | Literal["gaussian"] | None = field(default=True, repr=False, metadata={
        "help": "True: A Kaiming-uniform, B zeros (a no-op at start); 'gaussian': A normal with std 1 / r, B "
                "zeros (linear layers; convolutions take True's init); False / None: both standard normal "
                "(debugging). Embeddings always get A zeros, B standard normal unless False."})
    layers_to_transform: list[int] | int | None = field(default=None,
                                                        metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    rank_pattern: dict | None = field(default_factory=dict, metadata={
        "size": "dim_values", "keys": "modules",
        "help": "Module regex -> rank. As HF PEFT 0.21, only applied when an adapter is added to a layer "
                "that already holds a HiRA adapter; a newly wrapped layer gets r (a warning says so)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        lists_to_sets(self)
        if isinstance(self.target_modules, str):
            for option in ("layers_to_transform", "layers_pattern"):
                if getattr(self, option) is not None:
                    raise ValueError(f"HiraConfig: {option} cannot be used when target_modules is a regex "
                                     "string; give target_modules as a list of names.")
        check_positive_ints(self, "HiraConfig", ("r",))
        dropout = self.hira_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
            raise ValueError(f"HiraConfig.hira_dropout must be a probability in [0, 1], got {dropout!r}.")
        if not init_choice(self.init_weights):
            raise ValueError(f"HiraConfig.init_weights must be True, False, None or 'gaussian', got "
                             f"{self.init_weights!r}.")
        self.rank_pattern = {} if self.rank_pattern is None else self.rank_pattern
        if not isinstance(self.rank_pattern, dict):
            raise ValueError(f"HiraConfig.rank_pattern must be a dict {{module regex: rank}}, got "
                             f"{self.rank_pattern!r}.")
