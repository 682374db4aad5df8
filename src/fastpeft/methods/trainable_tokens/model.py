"""`TrainableTokensModel`: the tuner of the TRAINABLE_TOKENS method (input embedding by default, tied heads
follow)."""

from __future__ import annotations

from torch import nn

from ...core.dispatch import DispatchChain
from ...core.tuner import Tuner, set_submodule
from .._shared.embeddings import input_embedding, input_embedding_name, tied_module_names
from .layer import ROW_LAYERS, TrainableTokensLayer

DISPATCH = DispatchChain("TrainableTokens")
DISPATCH.register(ROW_LAYERS, TrainableTokensLayer)


class TrainableTokensModel(Tuner):
    dispatch = DISPATCH

    def prepare_config(self, config, model):
        # as HF PEFT: the input embedding's full name (a full-match pattern)
        if config.target_modules is None:
            config.target_modules = input_embedding_name(model) or "embed_tokens"
        return config

    def select_targets(self, model: nn.Module, config) -> list[tuple[str, nn.Module]]:
        """Modules tied to a targeted input embedding are left out here: they get tied layers afterwards."""
        targets = super().select_targets(model, config)
        embedding = input_embedding(model)
        if any(module is embedding for _, module in targets):
            tied = set(tied_module_names(model))
            targets = [(name, module) for name, module in targets if name not in tied]
        return targets

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       **options) -> None:
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, **options)
        if tie_to_input_embedding(model, adapter_name, lambda module, source: TrainableTokensLayer(
                module, adapter_name, tied_to=source)):
            self._freeze_base()
            self._apply_adapter_state()


def tie_to_input_embedding(model: nn.Module, adapter_name: str, build) -> bool:
    """Give every module tied to the input embedding a layer sharing its rows; True if any was added.

    `build(module, source_layer)` makes the tied holder; modules already tied are holders and are skipped.
    """
    embedding = input_embedding(model)
    source = getattr(embedding, "token_adapter", embedding)
    if not isinstance(source, TrainableTokensLayer) or adapter_name not in source.adapter_names():
        return False
    added = False
    for name in tied_module_names(model):
        module = model.get_submodule(name)
        if module.weight.shape != source.base_layer.weight.shape:
            continue
        holder = build(module, source)
        holder.train(module.training)
        set_submodule(model, name, holder)
        added = True
    return added
