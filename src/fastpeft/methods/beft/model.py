"""`BeftModel`: the BEFT tuner (nn.Linear targets; by default each model type's value projection)."""

from __future__ import annotations

from torch import nn

from ...core.dispatch import DispatchChain
from ...core.tuner import Tuner
from .._shared.common import fill_targets, is_nn_linear
from .layer import Linear

# HF PEFT's default targets for BEFT: the value projection of each attention block
V_PROJ_TYPES = ("opt", "gptj", "gpt_neo", "bart", "llama", "llama4", "mistral", "mixtral", "phi", "gemma",
                "gemma2", "gemma3_text", "qwen2", "qwen3")
BEFT_TARGETS: dict[str, list[str]] = {
    "t5": ["v"], "mt5": ["v"], "roberta": ["value"], "bert": ["value"], "deberta-v2": ["value_proj"],
    **{model_type: ["v_proj"] for model_type in V_PROJ_TYPES},
}

DISPATCH = DispatchChain("BEFT")
DISPATCH.register(nn.Linear, Linear)


class BeftModel(Tuner):
    dispatch = DISPATCH

    def prepare_config(self, config, model):
        return fill_targets(config, model, BEFT_TARGETS, "BEFT", is_nn_linear)

    def layer_kwargs(self, config, key: str, module: nn.Module) -> dict:
        return {"target_name": key}

    def check_mergeable(self) -> None:
        """All layers are checked first, so that a merge refused at one layer leaves none merged."""
        missing = [name for name, holder in self.holders() if isinstance(holder, Linear)
                   and holder.adapter_names() and holder.base_layer.bias is None]
        if missing:
            raise ValueError(
                f"BEFT cannot merge into layers without a bias: {missing[:5]}. BEFT adds its vector to the "
                "base layer's bias; keep these adapters unmerged (or unload() without merging).")
