"""`CPTConfig`: Context-aware Prompt Tuning (Blau et al., 2024), a prompt built from real example tokens.

`cpt_token_ids` are the in-context examples; `cpt_tokens_type_mask` tags each token (read modulo 4:
1 input template, 2 input, 3 output template, 0 label; 0 itself means "ignore").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...config import PromptLearningConfig

LOSS_TYPES = ("none", "decay")


@dataclass
class CPTConfig(PromptLearningConfig):
    cpt_token_ids: list[int] | None = field(default=None,
                                            metadata={"help": "Token ids of the context prompt."})
    cpt_mask: list[int] | None = field(default=None,
                                       metadata={"help": "Attention mask of the prompt (stored only)."})
    cpt_tokens_type_mask: list[int] | None = field(
        default=None, metadata={
            "help": "Type of each prompt token (mod 4: 1/2/3 template/input/template, 0 label)."})
    opt_weighted_loss_type: Literal["none", "decay"] | None = field(
        default="none", metadata={"help": "'none' (plain mean) or 'decay' (older examples weigh less)."})
    opt_loss_decay_factor: float | None = field(
        default=1.0, metadata={"help": "Weight factor per step back from the newest example ('decay')."})
    opt_projection_epsilon: float | None = field(
        default=0.1, metadata={
            "help": "L2 radius of the change allowed on input tokens (scaled by sqrt(d/2048))."})
    opt_projection_format_epsilon: float | None = field(
        default=0.1, metadata={
            "help": "L2 radius of the change allowed on template tokens (scaled likewise)."})
    tokenizer_name_or_path: str | None = field(default=None,
                                               metadata={"help": "Kept for HF PEFT files; unused."})

    def __post_init__(self) -> None:
        super().__post_init__()
        # the model fills these; CPT always works on the decoder's input embeddings
        self.num_layers = self.token_dim = self.num_attention_heads = None
        self.num_transformer_submodules = 1
        task = getattr(self.task_type, "value", self.task_type)
        if task != "CAUSAL_LM":
            raise ValueError(f"CPTConfig only supports task_type = CAUSAL_LM (got {task!r}); "
                             "use TaskType.CAUSAL_LM with a decoder-only language model.")
        if self.cpt_token_ids is None:
            self.cpt_token_ids = [0]
        self.num_virtual_tokens = len(self.cpt_token_ids)  # the prompt *is* the token list
        if self.cpt_mask is None:
            self.cpt_mask = [1] * len(self.cpt_token_ids)
        if self.cpt_tokens_type_mask is None:
            self.cpt_tokens_type_mask = [1] * len(self.cpt_token_ids)
        self._check_lengths()
        if self.opt_weighted_loss_type not in (*LOSS_TYPES, None):
            raise ValueError(
                f"opt_weighted_loss_type={self.opt_weighted_loss_type!r} is not one of {list(LOSS_TYPES)}.")

    def _check_lengths(self) -> None:
        sizes = (len(self.cpt_token_ids), len(self.cpt_mask), len(self.cpt_tokens_type_mask))
        if len(set(sizes)) != 1:
            raise ValueError(
                "cpt_token_ids, cpt_mask and cpt_tokens_type_mask must have the same length; got "
                f"{sizes[0]}, {sizes[1]} and {sizes[2]}. Give one mask entry per prompt token."
            )
