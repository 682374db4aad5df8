"""`TrainableTokensConfig`: HF PEFT 0.21's fields and defaults for training a few rows of an embedding."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig


@dataclass
class TrainableTokensConfig(PeftConfig):
    """Train the embedding rows of `token_indices` only; every other row stays as in the base model."""

    token_indices: list[int] = field(
        default_factory=list, metadata={
            "size": "token_ids", "help": "Token ids whose embedding rows are trained."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Embedding layer(s) to adapt; default: the model's input embedding."})
    init_weights: bool = field(
        default=True, metadata={
            "help": "Start from the current rows (a no-op until trained); False: random."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_index_list(self.token_indices, "TrainableTokensConfig.token_indices")


def check_index_list(indices, what: str) -> None:
    """Type check only (bounds need the layer): a list of non-negative ints without repeats."""
    if not isinstance(indices, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ValueError(f"{what} must be a list of token ids (ints), got {indices!r}.")
    negative = [i for i in indices if i < 0]
    if negative:
        raise ValueError(f"{what} has negative token ids {negative}; use ids in [0, vocab size).")
    seen: set[int] = set()
    repeated = sorted({i for i in indices if i in seen or seen.add(i)})
    if repeated:
        raise ValueError(f"{what} lists token ids {repeated} more than once; give each id once.")
