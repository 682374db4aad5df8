"""`LNTuningConfig`: HF PEFT 0.21's fields and defaults for LayerNorm tuning (Zhao et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig


@dataclass
class LNTuningConfig(PeftConfig):
    """Train a private copy of each targeted normalisation layer (or any other module) per adapter.

    Paper: "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning",
    https://arxiv.org/abs/2312.11420.
    """

    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Modules to copy and train (names, dotted suffixes or a full-match regex); default: the norm "
                "layers of the model type (methods/ln_tuning/model.py)."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Names (or a regex) of modules to leave untouched."})
    modules_to_save: list[str] | str | None = field(default=None, metadata={
        "help": "Other modules trained and saved whole (e.g. a new classifier head)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, list, set, tuple)):
                raise ValueError(f"LNTuningConfig.{name} must be a list of module names or a regex string, "
                                 f"got {type(value).__name__}.")
