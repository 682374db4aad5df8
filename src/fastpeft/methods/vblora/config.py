"""`VBLoRAConfig`: HF PEFT 0.21's fields and defaults for VB-LoRA (Li et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig
from .._shared.common import check_choice, check_layer_selection, check_positive_ints, lists_to_sets

BIAS_CHOICES = ("none", "all", "vblora_only")


@dataclass
class VBLoRAConfig(PeftConfig):
    """VB-LoRA: LoRA factors assembled from a vector bank shared by all layers
    (https://arxiv.org/abs/2405.15179).

    Every `vector_length`-long piece of A (r, in) and B (out, r) is a softmax-weighted mix of the `topk` bank
    vectors with the largest logits; the bank (`num_vectors` x `vector_length`) and the per-layer logits are
    trained.
    """

    r: int = field(default=4, metadata={"size": "dim", "help": "Rank of the update B @ A."})
    num_vectors: int = field(default=256, metadata={"size": "dim", "help": "Vectors in the shared bank."})
    vector_length: int = field(default=256, metadata={
        "size": "dim",
        "help": "Length of each bank vector; must divide the in and out features of every adapted layer."})
    topk: int = field(default=2, metadata={
        "size": "dim", "help": "Bank vectors mixed per sub-vector (the paper uses 2)."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Names (or dotted suffixes), a full-match regex, or 'all-linear'; default "
                "from the model type."})
    exclude_modules: list[str] | str | None = field(default=None,
                                                    metadata={"help": "Names or regex to skip."})
    save_only_topk_weights: bool = field(default=False, metadata={
        "help": "Save only the top-k indices and weights of the logits (a much smaller file; "
                "for inference only)."})
    vblora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    fan_in_fan_out: bool = field(default=False, metadata={
        "help": "Base weight stored as (in, out), e.g. transformers' Conv1D (set "
                "automatically per layer type)."})
    bias: str = field(default="none",
                      metadata={"help": "Biases trained too: 'none', 'all' or 'vblora_only'."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})
    init_vector_bank_bound: float = field(default=0.02, metadata={
        "help": "The bank starts uniform in [-bound, bound]."})
    init_logits_std: float = field(default=0.1, metadata={"help": "The logits start normal with this std."})
    layers_to_transform: list[int] | int | None = field(default=None,
                                                        metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})

    def __post_init__(self) -> None:
        super().__post_init__()
        lists_to_sets(self)
        self._validate()

    def _validate(self) -> None:
        check_layer_selection(self, "VBLoRAConfig")
        check_choice("VBLoRAConfig", "bias", self.bias, BIAS_CHOICES)
        check_positive_ints(self, "VBLoRAConfig", ("r", "num_vectors", "vector_length", "topk"))
        if self.topk > self.num_vectors:
            raise ValueError(f"VBLoRAConfig.topk={self.topk} exceeds num_vectors={self.num_vectors}: the "
                             "bank must hold at least topk vectors; lower topk or raise num_vectors.")
