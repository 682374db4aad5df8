"""Merging into a weight that several modules share, e.g. tied word embeddings.

An adapter on one side of a tied pair (say `lm_head` of a model with `tie_word_embeddings=True`, without
LoRA's `ensure_weight_tying`) changes that side only. Merging it into the one shared tensor would change the
other side as well (the input embedding), so the merged model would no longer compute what the adapted one
did; HF PEFT 0.21.2 does exactly that. fastpeft instead gives a merging layer its own copy of such a weight
first (logged), unless every other module sharing it receives the same update through its own adapter layer (a
layer that *follows* the weight, see `AdapterLayer.leaves_shared_weight`: LoRA's tied LM head under
ensure_weight_tying, tied trainable tokens).

Once the input and output embeddings of a transformers model hold different tensors, its config gets
`tie_word_embeddings=False` (logged): otherwise `save_pretrained` + `from_pretrained` of the merged model
would tie the head to the embedding again and silently drop the merged head.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from torch import nn

from .layer import AdapterLayer

logger = logging.getLogger(__name__)


def _owners(model: nn.Module) -> dict[int, list[nn.Module]]:
    """id(parameter) -> the modules holding it directly."""
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), []).append(module)
    return owners


def _merging(layer: AdapterLayer, adapter_names: list[str] | None) -> list[str]:
    """The adapters a merge with `adapter_names` (None: the active ones) would add to this layer's weight
    now."""
    names = layer.active_adapters if adapter_names is None else adapter_names
    own = layer.adapter_names()
    return [n for n in names if n in own and n not in layer.merged_adapters]


def _follows(layer: AdapterLayer | None, names: list[str]) -> bool:
    return layer is not None and all(layer.leaves_shared_weight(n) for n in names)


def _shared_weight(layer: AdapterLayer, owners: dict[int, list[nn.Module]]):
    """(weight, other modules holding it) of the layer's base module; (None, []) if it has no plain shared
    weight."""
    base = layer.get_base_layer()
    weight = base._parameters.get("weight")
    if weight is None or type(weight) is not nn.Parameter:  # quantised weights are never tied embeddings
        return None, []
    return weight, [m for m in owners.get(id(weight), ()) if m is not base]


def untie_before_merge(model: nn.Module, layers: Iterable[AdapterLayer],
                       adapter_names: list[str] | None = None) -> list[str]:
    """Give each layer about to merge a copy of a weight it shares with modules that would not get the same
    update; return the names of the modules so untied (each logged)."""
    layers = list(layers)
    owners = _owners(model)
    layer_of = {id(layer.get_base_layer()): layer for layer in layers}
    names_of = {id(module): name for name, module in model.named_modules()}
    untied = []
    for layer in layers:
        names = _merging(layer, adapter_names)
        if not names or _follows(layer, names):
            continue
        weight, sharers = _shared_weight(layer, owners)
        if not sharers or all(_follows(layer_of.get(id(m)), names) for m in sharers):
            continue
        layer.get_base_layer().weight = nn.Parameter(weight.detach().clone(),
                                                     requires_grad=weight.requires_grad)
        untied.append(names_of.get(id(layer), type(layer).__name__))
        logger.warning(
            "Merging adapter(s) %s into '%s', whose weight is shared with %s that do not get this update: "
            "'%s' now has its own copy of the weight (the other modules keep the original), so the merged "
            "model computes what the adapted one did.", names, untied[-1],
            sorted(names_of.get(id(m), "?") for m in sharers), untied[-1])
    return untied


def _raw_weight(module: nn.Module | None):
    """The weight tensor under any adapter wrapping (`original_module` / `get_base_layer()`)."""
    module = getattr(module, "original_module", module)
    module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return getattr(module, "weight", None)


def _embeddings(model: nn.Module):
    try:
        return model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None


def embeddings_tied(model: nn.Module) -> bool:
    """The config ties the word embeddings and the input / output embeddings (under any adapter wrapping) hold
    one tensor."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return False
    inputs, outputs = _embeddings(model)
    return inputs is not None and outputs is not None and _raw_weight(inputs) is _raw_weight(outputs)


def record_untied_embeddings(model: nn.Module, was_tied: bool) -> bool:
    """Where the embeddings were tied (`was_tied`) and no longer are (a merged or unloaded adapter changed one
    side): set `config.tie_word_embeddings = False` and log it."""
    if not was_tied or embeddings_tied(model):
        return False
    config = model.config
    config.tie_word_embeddings = False
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text_config is not None and getattr(text_config, "tie_word_embeddings", False):
        text_config.tie_word_embeddings = False
    logger.warning(
        "The input and output embeddings of this %s no longer share one weight (an adapter changed one "
        "side): set config.tie_word_embeddings=False, so that save_pretrained + from_pretrained keeps both "
        "instead of tying the output head to the input embedding again.", type(model).__name__)
    return True
