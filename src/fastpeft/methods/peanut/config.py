"""`PeanutConfig`: HF PEFT 0.21's fields and defaults for PEANuT, weight-aware neural tweakers (Zhong et al.,
2024, https://arxiv.org/abs/2410.01870)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig
from .._shared.common import check_layer_selection, lists_to_sets


def activations() -> dict:
    """transformers' activation table (imported on use: importing fastpeft needs no transformers)."""
    from transformers.activations import ACT2FN

    return ACT2FN


@dataclass
class PeanutConfig(PeftConfig):
    """PEANuT: each weight's update is a small network applied to the weight itself,
    dW = scaling * (B(f(W^T A^T) through depth encoder / decoder pairs))^T."""

    r: int = field(default=32, metadata={
        "size": "dim",
        "help": "Hidden width of the adapter network (like LoRA's rank: more capacity, more parameters)."})
    depth: int = field(default=0, metadata={
        "size": "dim",
        "help": "Encoder / decoder pairs between the input projection A and the output projection B "
                "(0: A and B only), each decoder output adding the matching encoder input back."})
    act_fn: str = field(default="relu", metadata={
        "help": "Activation between the adapter network's layers: a key of transformers' ACT2FN."})
    scaling: float = field(default=1.0, metadata={"help": "Multiplier of the weight update."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "nn.Linear modules to adapt: names, a full-match regex or 'all-linear'; default: the model "
                "type's attention projections."})
    exclude_modules: list[str] | str | None = field(default=None,
                                                    metadata={"help": "Names or regex to skip."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})
    layers_to_transform: list[int] | int | None = field(default=None,
                                                        metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: B starts at zero (the adapter starts as a no-op); False: B random like the others."})

    def __post_init__(self) -> None:
        super().__post_init__()
        lists_to_sets(self)
        check_layer_selection(self, "PeanutConfig", regex_targets=True)
        for name, lowest in (("r", 1), ("depth", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
                kind = "a positive" if lowest else "a non-negative"
                raise ValueError(f"PeanutConfig.{name} must be {kind} integer, got {value!r}.")
        table = activations()
        if self.act_fn not in table:
            raise ValueError(f"PeanutConfig.act_fn={self.act_fn!r} is not an activation of transformers' "
                             f"ACT2FN; use one of {sorted(table)}.")
