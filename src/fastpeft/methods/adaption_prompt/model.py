"""`AdaptionPromptModel`: wraps the top `adapter_layers` attention modules of Llama / Mistral / GPT-2 models.

Targets are every module named `*.{target_modules}` in `named_modules` order, of which the last
`adapter_layers` (the top of the stack) get adaption prompts, as in HF PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...core import targeting
from ...core.dispatch import DispatchChain
from ...core.layer import AdapterHolder, AdapterLayer
from ...core.tuner import Tuner
from . import layer


@dataclass(frozen=True)
class ModelTypeSpec:
    """Per `model.config.model_type`: the attention sub-module name and the wrapper class for it."""

    target_modules: str
    layer_cls: type
    projections: tuple[str, ...]


LLAMA_LIKE = ModelTypeSpec("self_attn", layer.LlamaAdaptedAttention, ("q_proj", "k_proj", "v_proj", "o_proj"))
MODEL_TYPES: dict[str, ModelTypeSpec] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "gpt2": ModelTypeSpec("attn", layer.GPT2AdaptedAttention, ("c_attn", "c_proj")),
}


def model_type_spec(model: nn.Module) -> ModelTypeSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"Unsupported model type for adaption prompt: {model_type!r}. Adaption prompts support the "
            f"model types {sorted(MODEL_TYPES)}; use another method (e.g. LoRA) for this model."
        )
    return MODEL_TYPES[model_type]


def _dispatch_for(spec: ModelTypeSpec) -> DispatchChain:
    chain = DispatchChain("Adaption prompt")

    def has_projections(module: nn.Module) -> bool:
        return all(isinstance(getattr(module, p, None), nn.Module) for p in spec.projections)

    has_projections.__name__ = f"attention with {'/'.join(spec.projections)}"
    chain.register(has_projections, spec.layer_cls)
    return chain


def _check_sizes(config) -> None:
    for field_name in ("adapter_len", "adapter_layers"):
        value = getattr(config, field_name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"AdaptionPromptConfig.{field_name} must be a positive integer, got {value!r}; set it, e.g. "
                f"AdaptionPromptConfig(adapter_len=10, adapter_layers=2)."
            )


class AdaptionPromptModel(Tuner):
    def prepare_config(self, config, model):
        spec = model_type_spec(model)
        _check_sizes(config)
        if config.target_modules is None:
            config.target_modules = spec.target_modules
        self.dispatch = _dispatch_for(spec)
        return config

    def select_targets(self, model: nn.Module, config) -> list[tuple[str, nn.Module]]:
        """The top `adapter_layers` modules named `*.{target_modules}` (module order = layer order)."""
        suffix = f".{config.target_modules}"
        found = [(n, m) for n, m in targeting.candidate_modules(model, (AdapterHolder,))
                 if n.endswith(suffix)]
        if len(found) < config.adapter_layers:
            raise ValueError(
                f"Config specifies more adapter layers '{config.adapter_layers}' than the model has "
                f"'{len(found)}' (modules named '*{suffix}'); lower adapter_layers to at most {len(found)}."
            )
        return found[-config.adapter_layers:]

    def _place_adapter(self, new_layer: AdapterLayer, adapter_name: str, autocast: bool) -> None:
        """Prompts are created on the attention's device and dtype (no float32 autocast, as in HF PEFT)."""
        new_layer.train(new_layer.get_base_layer().training)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        raise ValueError(layer.NOT_MERGEABLE)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        raise ValueError(layer.NOT_MERGEABLE)
