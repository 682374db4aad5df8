"""`LNTuningModel`: the LN_TUNING tuner (any module type can be targeted; norm layers by default)."""

from __future__ import annotations

from torch import nn

from ...core.dispatch import DispatchChain
from ...core.layer import AdapterLayer
from ...core.tuner import Tuner
from .._shared.common import fill_targets
from .layer import LNTuningLayer

_DECODER_NORMS = ["input_layernorm", "post_attention_layernorm", "norm"]
_GEMMA2_NORMS = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm", "norm"]

# model_type -> names of the modules LN tuning copies when target_modules is None (HF PEFT 0.21's table)
LN_TUNING_TARGETS: dict[str, list[str]] = {
    "llama": _DECODER_NORMS,
    "mistral": _DECODER_NORMS,
    "gemma": _DECODER_NORMS,
    "gemma2": _GEMMA2_NORMS,
    "gemma3_text": _GEMMA2_NORMS,
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "llava": ["multi_modal_projector", *_DECODER_NORMS, "embed_tokens", "lm_head"],
    "t5": ["layer_norm", "final_layer_norm"],
    "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "gptj": ["ln_1", "ln_f"],
    "blip-2": ["layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"],
    "phi": ["input_layernorm", "final_layernorm"],
    "qwen2": ["post_attention_layernorm"],
    "qwen3": ["post_attention_layernorm"],
}


def any_module(module: nn.Module) -> bool:
    return True


DISPATCH = DispatchChain("LN tuning")
DISPATCH.register(any_module, LNTuningLayer)


class LNTuningModel(Tuner):
    dispatch = DISPATCH

    def prepare_config(self, config, model):
        return fill_targets(config, model, LN_TUNING_TARGETS, "LN tuning")

    def _place_adapter(self, layer: AdapterLayer, adapter_name: str, autocast: bool) -> None:
        """The copies keep the dtype and device of the module they copy (no fp32 autocast, as HF PEFT)."""
        layer.train(layer.get_base_layer().training)
