"""`BottleneckModel`: the BOTTLENECK tuner. Targets come from the architecture table (architectures.py) and
the config's `mh_adapter` / `output_adapter` / `leave_out`, not from module-name patterns."""

from __future__ import annotations

from torch import nn

from ...core import targeting
from ...core.dispatch import DispatchChain
from ...core.layer import AdapterHolder
from ...core.tuner import Tuner
from ...errors import NoMatchingPeftModuleError
from .architectures import architecture_for, check_block, locate
from .layer import BottleneckLayer, merge_refusal


def any_module(module: nn.Module) -> bool:
    return True  # select_targets has checked each target against the architecture table


DISPATCH = DispatchChain("Bottleneck")
DISPATCH.register(any_module, BottleneckLayer)


class BottleneckModel(Tuner):
    """Adds bottleneck adapters to the output blocks of BERT-family encoders (architectures.py). Several
    active adapters are stacked (the adapters library's `Stack`); mixed batches give each row its adapter;
    merging is refused (the adapter is non-linear)."""

    dispatch = DISPATCH

    def select_targets(self, model: nn.Module, config) -> list[tuple[str, nn.Module]]:
        arch = architecture_for(model)
        wanted = {"mh_adapter": config.mh_adapter, "output_adapter": config.output_adapter}
        skip = set(config.leave_out or [])
        candidates = targeting.candidate_modules(model, (AdapterHolder,))
        targets = []
        for name, module in candidates:
            place = locate(arch, name)
            if place is None or not wanted[place[0]] or place[1] in skip:
                continue
            if targeting.is_excluded(config, name):  # modules_to_save
                continue
            block = module.get_base_layer() if isinstance(module, BottleneckLayer) else module
            check_block(arch, name, block)
            targets.append((name, module))
        if self.__dict__.get("_state_dict_modules") is not None:
            targets = self._targets_from_state_dict(candidates, targets)
        if not targets:
            raise NoMatchingPeftModuleError(
                f"No output block of this {type(model).__name__} gets a bottleneck adapter (mh_adapter="
                f"{config.mh_adapter}, output_adapter={config.output_adapter}, leave_out={config.leave_out}"
                "): enable a location or leave fewer layers out.")
        return targets

    def layer_kwargs(self, config, key: str, module: nn.Module) -> dict:
        arch = architecture_for(self.model)
        location, layer = locate(arch, key)
        return {"arch": arch, "layer": layer, "location": location, "target_name": key}

    def check_mergeable(self) -> None:
        raise ValueError(merge_refusal())

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, *args,
                             **kwargs) -> None:
        """Refused: a weighted sum of bottleneck MLPs is not a bottleneck MLP (the non-linearity sits between
        the projections), so no combined adapter reproduces the weighted outputs."""
        raise NotImplementedError(
            "add_weighted_adapter is not available for bottleneck adapters: they are non-linear, so their "
            "weights cannot be combined into one adapter. Activate several adapters to stack them "
            "(base_model.set_adapter([...])) or give rows different adapters (adapter_names=[...]).")
