"""`OFTConfig`: the fields and defaults of HF PEFT 0.21.2's OFT config (all of them, so files round-trip)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

from ...config import PeftConfig
from .._shared.common import check_block_choice, check_choice, check_layer_selection, lists_to_sets

logger = logging.getLogger(__name__)

OFT_BIAS_VALUES = ("none", "all", "oft_only")


@dataclass
class OFTConfig(PeftConfig):
    """Orthogonal Finetuning (Qiu et al., 2023, https://arxiv.org/abs/2306.07280): the layer input is rotated
    by a block-diagonal orthogonal matrix (Cayley transform of trainable skew-symmetric blocks)."""

    r: int = field(default=0, metadata={
        "size": "dim",
        "help": "Number of OFT blocks per layer; give either r or oft_block_size (the other must be 0)."})
    oft_block_size: int = field(default=32, metadata={
        "size": "dim",
        "help": "Size of each OFT block; r x oft_block_size = the layer's input size "
                "(adjusted to a divisor)."})
    module_dropout: float = field(default=0.0, metadata={
        "help": "Block dropout probability (accepted for file compatibility; HF PEFT "
                "0.21.2 does not apply it)."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Names, regex or 'all-linear'; default from the model type."})
    fan_in_fan_out: bool = field(default=False,
                                 metadata={"help": "Weights stored (in, out); False for nn.Linear."})
    bias: Literal["none", "all", "oft_only"] = field(default="none", metadata={
        "help": "Which base biases train: 'none', 'all' or 'oft_only' (those of adapted layers)."})
    exclude_modules: list[str] | str | None = field(default=None,
                                                    metadata={"help": "Names or regex to skip."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: identity rotation at start; False: random blocks (normal, std 0.1), for tests."})
    layers_to_transform: list[int] | int | None = field(default=None,
                                                        metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})
    coft: bool = field(default=False, metadata={
        "help": "Constrained OFT: keep each block's skew matrix within radius eps "
                "(projected before each use)."})
    eps: float = field(default=6e-5, metadata={"help": "COFT radius (only with coft=True)."})
    block_share: bool = field(default=False, metadata={"help": "One block shared by all blocks of a layer."})
    use_cayley_neumann: bool = field(default=True, metadata={
        "help": "Approximate the Cayley transform by a Neumann series (matmuls only) "
                "instead of a linear solve."})
    num_cayley_neumann_terms: int = field(default=5, metadata={
        "size": "dim", "help": "Terms of the Neumann series."})

    def __post_init__(self) -> None:
        super().__post_init__()
        lists_to_sets(self)
        check_layer_selection(self, "OFTConfig")
        check_block_choice("OFTConfig", "r", self.r, "oft_block_size", self.oft_block_size)
        check_choice("OFTConfig", "bias", self.bias, OFT_BIAS_VALUES)
        if not 0.0 <= self.module_dropout < 1.0:
            raise ValueError(f"OFTConfig.module_dropout={self.module_dropout} must be in [0, 1).")
        if self.use_cayley_neumann and self.num_cayley_neumann_terms < 1:
            raise ValueError("OFTConfig.num_cayley_neumann_terms must be >= 1 when use_cayley_neumann=True.")
        if self.module_dropout > 0:
            logger.info("OFTConfig.module_dropout has no effect (as in HF PEFT 0.21.2).")

    @classmethod
    def from_dict(cls, data: dict) -> OFTConfig:
        if "oft_block_size" not in data:
            raise ValueError(
                "This OFT adapter_config.json has no 'oft_block_size': it was written by PEFT < 0.14, whose "
                "OFT weights are incompatible. Retrain the adapter (or load it with PEFT <= 0.13)."
            )
        if data.get("use_cayley_neumann") and _older_than(data.get("peft_version"), "0.18.0"):
            logger.warning("This OFT adapter was saved by PEFT < 0.18, whose Cayley-Neumann series differed "
                           "slightly; its outputs will not be exactly those it was trained with. "
                           "Retrain it to be exact.")
        return super().from_dict(data)

    @property
    def neumann_terms(self) -> int | None:
        """Terms of the Neumann series, or None for the exact Cayley transform."""
        return self.num_cayley_neumann_terms if self.use_cayley_neumann else None


def _older_than(version: str | None, reference: str) -> bool:
    """True for a missing version (the field exists since PEFT 0.18) or one below `reference`."""
    from packaging.version import Version

    return Version((version or "0.0.0").partition("@")[0]) < Version(reference)
