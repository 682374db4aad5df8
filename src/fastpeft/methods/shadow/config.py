"""`ShadowConfig`: HF PEFT 0.21's fields and defaults for ShadowPEFT, a trainable parallel "shadow" network
that rides a frozen decoder's layer loop."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig
from .._shared.common import check_layer_selection, check_positive_ints, lists_to_sets

# the backbone overrides that only apply when the shadow backbone is built from the base config ("mirror")
MIRROR_OVERRIDES = ("shadow_num_hidden_layers", "shadow_hidden_size", "shadow_num_attention_heads",
                    "shadow_intermediate_size")


@dataclass
class ShadowConfig(PeftConfig):
    """ShadowPEFT: a small shadow backbone computes a state s0 from the inputs; at every wrapped decoder block
    the difference between the base hidden states and the shadow state is injected back through a rank-`r`
    bottleneck (paper Eq. 2-4), and the shadow state is advanced by a gated update from the block output
    (Eq. 5-7). An auxiliary loss trains the shadow path's own prediction (Eq. 8-9), so the shadow network can
    be detached and run alone (`ShadowModel.unload_shadow`). Not mergeable: the change depends on the input.
    """

    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Decoder blocks to wrap (whole blocks, contiguous, in one nn.ModuleList): names or a "
                "full-match regex such as '.*\\.layers\\.\\d+$'; default: every decoder block."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Names (or a regex) of blocks not to wrap."})
    r: int = field(default=8, metadata={
        "size": "dim", "help": "Rank of the injection bottleneck W_down (d -> r) / W_up (r -> d)."})
    shadow_alpha: float = field(default=0.1, metadata={
        "help": "Strength of the correction added onto each wrapped block's input (Eq. 4)."})
    shadow_dropout: float = field(default=0.2, metadata={
        "help": "Dropout on the hidden / shadow difference before the bottleneck (Eq. 3)."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: W_up starts at zero, so the adapted model starts equal to the base model."})
    shadow_model: str = field(default="mirror", metadata={
        "help": "'mirror': the shadow backbone is the base model's backbone class built from its config with "
                "the shadow_* overrides (default one layer). Otherwise a model id or folder: a transformers "
                "checkpoint (loaded with AutoModel, its embeddings frozen) or a projected shadow checkpoint "
                "(model_type 'causal_lm_with_hidden_projection': backbone plus trained projection)."})
    shadow_num_hidden_layers: int | None = field(default=None, metadata={
        "size": "dim", "help": "Depth of the mirrored shadow backbone (default: 1)."})
    shadow_hidden_size: int | None = field(default=None, metadata={
        "size": "dim", "help": "Hidden size of the shadow backbone (default: the base model's); another size "
                               "adds a bias-free projection to the base size."})
    shadow_num_attention_heads: int | None = field(default=None, metadata={
        "size": "dim", "help": "Attention heads of the shadow backbone (default: the base model's)."})
    shadow_intermediate_size: int | None = field(default=None, metadata={
        "size": "dim", "help": "Feed-forward width of the shadow backbone (default: the base model's)."})
    share_embeddings: bool = field(default=True, metadata={
        "help": "Feed the shadow backbone the frozen base input embeddings (its own table is dropped); "
                "applies when the shadow hidden size equals the base one."})
    update_hidden_size: int | None = field(default=None, metadata={
        "size": "dim", "help": "Hidden width of the candidate (T) and gate (G) update MLPs (default: r)."})
    auxiliary_loss_weight: float = field(default=0.05, metadata={
        "help": "Weight of the shadow path's own task loss added to the loss when labels are passed; 0 keeps "
                "it out of the loss (it is still reported as output.shadow_loss)."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={
        "help": "Block indices to wrap (default: every matched block)."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={
        "help": "Name of the nn.ModuleList holding the blocks, used with layers_to_transform."})
    modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "Modules trained and saved whole (e.g. 'lm_head'; a classifier head is added for SEQ_CLS)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        lists_to_sets(self)
        check_layer_selection(self, "ShadowConfig", regex_targets=True)
        check_positive_ints(self, "ShadowConfig", ("r",))
        optional = [name for name in (*MIRROR_OVERRIDES, "update_hidden_size")
                    if getattr(self, name) is not None]
        check_positive_ints(self, "ShadowConfig", optional)
        if not 0.0 <= self.shadow_dropout <= 1.0:
            raise ValueError(f"ShadowConfig.shadow_dropout must be in [0, 1], got {self.shadow_dropout!r}.")
        if self.auxiliary_loss_weight < 0:
            raise ValueError("ShadowConfig.auxiliary_loss_weight must be >= 0 (0 turns the auxiliary loss "
                             f"off), got {self.auxiliary_loss_weight!r}.")
        if self.shadow_model != "mirror":
            set_overrides = [name for name in MIRROR_OVERRIDES if getattr(self, name) is not None]
            if set_overrides:
                raise ValueError(
                    f"ShadowConfig: shadow_model={self.shadow_model!r} is a checkpoint, which defines its "
                    f"own architecture; unset the mirror-only options {set_overrides}.")
