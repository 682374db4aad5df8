"""`IA3Model`: the (IA)^3 tuner (dispatch, default targets, feed-forward roles, weighted combinations)."""

from __future__ import annotations

import dataclasses
import logging
import re

from torch import nn

from ...core.auxiliary import ModulesToSaveWrapper
from ...core.dispatch import DispatchChain
from ...core.tuner import Tuner
from ...quant.merge import AllOrNothingMerge, register_quantised
from .._shared.common import align_fan_in_fan_out, fill_targets
from .._shared.modules import is_linear
from . import bnb, layer
from .defaults import IA3_TARGETS, default_feedforward

logger = logging.getLogger(__name__)

DISPATCH = DispatchChain("IA3")
DISPATCH.register((nn.Conv2d, nn.Conv3d), layer.Conv)
DISPATCH.register(is_linear, layer.Linear)
register_quantised(DISPATCH, bnb.Linear4bit, bnb.Linear8bitLt)  # bitsandbytes layers first


def is_feedforward(config, key: str) -> bool:
    """Does target `key` get an input vector? A string is a full-match regex; a list entry matches any ending
    of the name (a plain string suffix, as HF PEFT checks it)."""
    spec = config.feedforward_modules
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return any(key.endswith(entry) for entry in spec or ())


class IA3Model(AllOrNothingMerge, Tuner):
    dispatch = DISPATCH
    # feedforward_modules names targets: keep target_modules as given (as HF PEFT)
    condense_target_list = False

    def prepare_config(self, config, model):
        fill_targets(config, model, IA3_TARGETS, "IA3", is_linear)
        if config.feedforward_modules is None:
            config.feedforward_modules = default_feedforward(model)
        return config

    def layer_kwargs(self, config, key, module):
        kwargs = {"is_feedforward": is_feedforward(config, key)}
        if not isinstance(module, layer.IA3Layer) and is_linear(module):
            kwargs["fan_in_fan_out"] = align_fan_in_fan_out(config, module, key)
        return kwargs

    # ------------------------------------------------------------------ weighted combinations
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Add `adapter_name` whose vectors are sum_i weights[i] * vector of adapters[i] (HF PEFT's
        signature).

        Its targets are the union of the sources' targets (likewise feedforward_modules); on a layer, sources
        without a vector there contribute nothing. The new adapter is not activated: call set_adapter to use
        it. If `adapter_name` exists already, nothing happens (as HF PEFT).
        """
        if adapter_name in self.peft_config:
            logger.warning("add_weighted_adapter: adapter '%s' exists already; nothing was added.",
                           adapter_name)
            return
        adapters, weights = list(adapters), [float(w) for w in weights]
        targets, feedforward = self._weighted_targets(adapters, weights)
        self.peft_config[adapter_name] = dataclasses.replace(
            self.peft_config[adapters[0]], target_modules=targets, feedforward_modules=feedforward)
        self.inject_adapter(self.model, adapter_name)
        for ia3_layer in list(self.adapter_layers()):
            if adapter_name in ia3_layer.ia3_l:
                _fill_weighted(ia3_layer, adapter_name, adapters, weights)

    def _weighted_targets(self, adapters: list[str], weights: list[float]):
        if not adapters or len(weights) != len(adapters):
            raise ValueError(
                f"add_weighted_adapter needs one weight per adapter and at least one adapter; got adapters="
                f"{adapters} and weights={weights}."
            )
        missing = [a for a in adapters if a not in self.peft_config]
        if missing:
            raise ValueError(
                f"Adapter(s) {missing} do not exist; loaded adapters: {sorted(self.peft_config)}.")
        for _, holder in self.holders():
            if (isinstance(holder, ModulesToSaveWrapper)
                and sum(a in holder.modules_to_save for a in adapters) > 1):
                raise ValueError(
                    "Cannot combine adapters that each keep their own copy of the same modules_to_save "
                    "module; combine adapters that share no modules_to_save."
                )
        configs = [self.peft_config[a] for a in adapters]
        return _union(configs, "target_modules"), _union(configs, "feedforward_modules")


def _union(configs, field_name: str):
    """The sources' `field_name` together: regex strings OR-ed, sets united (mixing the two is refused)."""
    values = [getattr(c, field_name) for c in configs]
    kinds = {type(v) for v in values}
    if len(kinds) > 1:
        raise ValueError(
            f"add_weighted_adapter: the adapters give {field_name} as different kinds "
            f"({sorted(k.__name__ for k in kinds)}); all must use a regex string or all a list of names."
        )
    if isinstance(values[0], str):
        return "|".join(f"({v})" for v in values)
    return set().union(*values)


def _fill_weighted(ia3_layer, adapter_name: str, adapters: list[str], weights: list[float]) -> None:
    target = ia3_layer.ia3_l[adapter_name]
    target.data.zero_()
    for source, weight in zip(adapters, weights):
        if source in ia3_layer.ia3_l:
            target.data += ia3_layer.ia3_l[source].data * weight
