"""`XLoraConfig`: HF PEFT 0.21's fields and defaults for X-LoRA, a mixture of frozen LoRA experts gated per
token and per layer by a small classifier (Buehler & Buehler, 2024, arXiv:2402.07148)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ...config import PeftConfig

logger = logging.getLogger(__name__)

DEFAULT_HIDDEN_SIZE = 4096  # HF PEFT's fallback when hidden_size is not given


@dataclass
class XLoraConfig(PeftConfig):
    """Mix the LoRA adapters named in `adapters` (loaded as frozen experts) with per-token scalings that a
    classifier predicts from the base model's last hidden state (https://arxiv.org/abs/2402.07148)."""

    hidden_size: int = field(default=None, metadata={  # type: ignore[assignment]
        "help": "Hidden size of the base model (the classifier's input width).", "size": "dim"})
    adapters: dict[str, str] = field(default=None, metadata={  # type: ignore[assignment]
        "help": "Expert name -> LoRA adapter folder or Hub id, loaded as the experts in this order (the "
                "classifier's class i is the i-th entry). PeftModel.from_pretrained(..., adapters={...}) "
                "replaces the saved paths (e.g. after the expert folders moved).",
        "load_kwarg": True})
    enable_softmax: bool = field(default=True, metadata={
        "help": "Softmax over the classifier's logits (per token and layer)."})
    enable_softmax_topk: bool = field(default=False, metadata={
        "help": "Softmax over the top_k_lora kept scalings only (use with top_k_lora, without "
                "enable_softmax)."})
    layerwise_scalings: bool = field(default=False, metadata={
        "help": "One set of scalings per LoRA layer; False: the same scalings broadcast to every layer."})
    xlora_depth: int = field(default=1, metadata={
        "help": "Number of linear layers of the classifier.", "size": "dim"})
    xlora_size: int = field(default=2048, metadata={
        "help": "Hidden width of the classifier (used when xlora_depth > 1).", "size": "matrix"})
    xlora_dropout_p: float = field(default=0.2, metadata={
        "help": "Dropout between the classifier's layers (used when xlora_depth > 1)."})
    use_trainable_adapters: bool = field(default=False, metadata={
        "help": "Train the LoRA experts too (default: only the classifier trains)."})
    softmax_temperature: float = field(default=1.0, metadata={
        "help": "Temperature of the softmax; lower gives sharper scalings."})
    top_k_lora: int | None = field(default=None, metadata={
        "help": "Keep only the top-k experts' scalings per token (None: all, dense)."})
    scaling_pass_value: float = field(default=0.0, metadata={
        "help": "Value of every scaling during the scaling pass (the pass that feeds the classifier)."})
    global_scaling_weight: float = field(default=1.0, metadata={
        "help": "Multiplier applied to every expert's output."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_size is None:
            logger.warning("XLoraConfig: no hidden_size given, using %d; set it to the base model's hidden "
                           "size.", DEFAULT_HIDDEN_SIZE)
            self.hidden_size = DEFAULT_HIDDEN_SIZE
        if self.adapters is None:
            self.adapters = {}
        if not isinstance(self.adapters, dict):
            raise TypeError(f"XLoraConfig.adapters must be a dict of expert name -> LoRA adapter path, got "
                            f"{type(self.adapters).__name__}.")
        if self.xlora_depth is not None and self.xlora_depth <= 0:
            raise ValueError(f"xlora_depth must be at least 1, got {self.xlora_depth}.")
        if self.top_k_lora is not None and self.top_k_lora < 1:
            raise ValueError(
                f"top_k_lora must be at least 1 (or None for all experts), got {self.top_k_lora}.")
        if self.enable_softmax_topk and self.top_k_lora is None:
            logger.warning("XLoraConfig: enable_softmax_topk is set but top_k_lora is not.")
        if self.enable_softmax_topk and self.enable_softmax:
            logger.warning("XLoraConfig: enable_softmax_topk and enable_softmax are both on; a softmax over "
                           "a softmax gives flatter scalings.")
