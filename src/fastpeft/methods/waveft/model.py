"""`WaveFTModel`: the WaveFT tuner (dispatch, per-module or proportional n_frequency, default targets,
bias training)."""

from __future__ import annotations

from torch import nn

from ...core.dispatch import DispatchChain
from ...core.layer import AdapterLayer
from ...core.targeting import pattern_value
from ...core.tuner import Tuner
from .._shared.common import align_fan_in_fan_out, bias_file_keys, fill_targets, train_base_biases
from .._shared.modules import is_linear, linear_dims
from .layer import WaveFTLinear, check_n_frequency

# HF PEFT's default targets for WaveFT: (model types, target_modules)
_TARGET_GROUPS = (
    (("t5", "mt5"), ["q", "v"]),
    (("bart", "opt", "gptj", "gpt_neo", "llama", "llama4", "mistral", "mixtral", "stablelm", "gemma",
      "gemma2", "gemma3_text", "qwen2", "qwen3"), ["q_proj", "v_proj"]),
    (("gpt2", "gpt_bigcode"), ["mlp.c_proj"]),
    (("bloom", "gpt_neox", "chatglm", "RefinedWebModel", "RefinedWeb", "falcon"), ["query_key_value"]),
    (("blip-2",), ["q", "v", "q_proj", "v_proj"]),
    (("bert", "roberta", "xlm-roberta", "electra", "layoutlm"), ["query", "value"]),
    (("deberta-v2",), ["query_proj", "value_proj"]),
    (("deberta",), ["in_proj"]),
    (("mpt",), ["Wqkv"]),
    (("codegen",), ["qkv_proj"]),
    (("phi",), ["q_proj", "v_proj", "fc1", "fc2"]),
    (("gemma4",), r".*language_model\..*\.(q_proj|v_proj)"),
    (("nemotron_h",), ["q_proj", "k_proj", "v_proj", "o_proj"]),
)
WAVEFT_TARGETS: dict[str, list[str] | str] = {
    model: targets if isinstance(targets, str) else list(targets)
    for models, targets in _TARGET_GROUPS for model in models}

DISPATCH = DispatchChain("WaveFT")
DISPATCH.register(is_linear, WaveFTLinear)


def _dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a target WaveFT can adapt (a WaveFT layer's base); None for others (refused later)."""
    base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
    return linear_dims(base) if is_linear(base) else None


def proportional_sizes(config, sized: list[tuple[str, int, int]]) -> dict[str, int]:
    """As HF PEFT: a budget of n_frequency per target, shared in proportion to in * out, rounded (Python's
    round), at least 1 per layer."""
    total = sum(i * o for _, i, o in sized)
    budget = config.n_frequency * len(sized)
    return {key: max(1, round(i * o / total * budget)) for key, i, o in sized}


class WaveFTModel(Tuner):
    dispatch = DISPATCH

    def prepare_config(self, config, model):
        return fill_targets(config, model, WAVEFT_TARGETS, "WaveFT", is_linear)

    def select_targets(self, model, config):
        """The targets, and every target's n_frequency checked against its size before any layer is
        built."""
        targets = super().select_targets(model, config)
        sized = [(key, *dims) for key, module in targets if (dims := _dims(module)) is not None]
        if config.proportional_parameters:
            sizes = proportional_sizes(config, sized)
        else:
            sizes = {key: pattern_value(config.n_frequency_pattern, key, config.n_frequency)
                     for key, _, _ in sized}
        for key, in_f, out_f in sized:
            check_n_frequency(sizes[key], key, in_f, out_f)
        self._sizes = sizes
        return targets

    def layer_kwargs(self, config, key: str, module: nn.Module) -> dict:
        if not isinstance(module, AdapterLayer):
            align_fan_in_fan_out(config, module, key)
        return {"n_frequency": self._sizes[key], "target_name": key}

    base_file_keys = staticmethod(bias_file_keys)  # the biases `bias` trains are saved with the adapter

    def mark_extra_trainable(self, adapter_name, config):
        train_base_biases(self, adapter_name, config.bias)
