"""`LilyModel`: the Lily tuner (nn.Linear targets, LoRA's default targets per model type). When the model is
created, A and B modules are shared across layers as in the paper (https://arxiv.org/abs/2407.09946)."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ...core.dispatch import DispatchChain
from ...core.tuner import Tuner
from ...integrations.transformers_defaults import LORA_TARGETS
from .._shared.common import fill_targets, is_nn_linear
from .layer import NOT_MERGEABLE, LilyLayer, Linear

logger = logging.getLogger(__name__)

DISPATCH = DispatchChain("Lily")
DISPATCH.register(nn.Linear, Linear)


def _group_suffix(key: str, targets) -> str | None:
    """The target entry a layer is grouped under, as HF PEFT picks it: a regex string is one group; from a
    collection, the last entry (in iteration order) that the module name ends with."""
    if isinstance(targets, str):
        return targets
    found = None
    for suffix in targets or ():
        if key.endswith(suffix):
            found = suffix
    return found


class LilyModel(Tuner):
    dispatch = DISPATCH

    def prepare_config(self, config, model):
        return fill_targets(config, model, LORA_TARGETS, "Lily", is_nn_linear)

    def check_mergeable(self) -> None:
        raise NotImplementedError(NOT_MERGEABLE)

    def __init__(self, model, peft_config, adapter_name: str = "default", **kwargs) -> None:
        self.__dict__["_constructing"] = True
        super().__init__(model, peft_config, adapter_name, **kwargs)
        self.__dict__["_constructing"] = False
        self.share_across_layers(adapter_name)

    def inject_adapter(self, model, adapter_name, *args, **kwargs) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        if not self.__dict__.get("_constructing"):
            # HF PEFT 0.21 shares only in the tuner's constructor (its post-injection hook): an adapter added
            # later keeps one A and B per layer there, and files of such adapters hold distinct per-layer
            # tensors; kept so, so that those files load unchanged
            logger.warning("Lily adapter '%s' added to an existing model: its layers do not share A / B (as "
                           "in HF PEFT, sharing is set up for the adapter the model is created with).",
                           adapter_name)

    def share_across_layers(self, adapter_name: str) -> None:
        """Layers of one group (target entry, weight shape), in module order: all use the first layer's B
        (num_B * r, out), and each run of `stride_A` consecutive layers uses its first layer's A. The layers
        were built (and drew their random init) one by one first, as HF PEFT does."""
        config = self.peft_config[adapter_name]
        groups: dict[tuple, list[LilyLayer]] = {}
        for key, module in self.model.named_modules():
            if not isinstance(module, LilyLayer) or adapter_name not in module.lily_A:
                continue
            suffix = _group_suffix(key, config.target_modules)
            if suffix is not None:
                shape = tuple(module.get_base_layer().weight.shape)
                groups.setdefault((suffix, shape), []).append(module)
        for layers in groups.values():
            shared_b = layers[0].lily_B[adapter_name]
            for i, layer in enumerate(layers):
                leader = layers[(i // config.stride_A) * config.stride_A]
                if i:
                    layer.lily_B[adapter_name] = shared_b
                if leader is not layer:
                    layer.lily_A[adapter_name] = leader.lily_A[adapter_name]

    def convert_loaded_state(self, adapter_name: str, tensors: dict, root: nn.Module) -> dict:
        """A file may hold different tensors for layers that this model shares an A / B between (an adapter
        HF PEFT added to an existing model keeps one per layer): those layers get their own copy, so the
        loaded adapter computes what the saved one did instead of the last layer's tensor winning."""
        for attr in ("lily_A", "lily_B"):
            groups: dict[int, list[tuple[str, LilyLayer]]] = {}
            for prefix, module in root.named_modules():
                if isinstance(module, LilyLayer) and adapter_name in getattr(module, attr):
                    groups.setdefault(id(getattr(module, attr)[adapter_name]), []).append((prefix, module))
            for members in groups.values():
                values = [tensors.get(f"{prefix}.{attr}.weight") for prefix, _ in members]
                if len(members) < 2 or any(v is None for v in values):
                    continue
                if all(torch.equal(values[0], v) for v in values[1:]):
                    continue
                logger.warning("The file holds different %s tensors for layers sharing one here (%s, ...): "
                               "each layer keeps its own, as in the file.", attr, members[0][0])
                for _, layer in members[1:]:
                    holder = getattr(layer, attr)
                    holder[adapter_name] = copy.deepcopy(holder[adapter_name])
        return tensors
