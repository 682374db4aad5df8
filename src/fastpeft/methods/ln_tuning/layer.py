"""`LNTuningLayer`: holds one trainable copy of the wrapped module per adapter and runs the active copy.

Merging swaps the trained copy in as the base layer (and the original out into the adapter's slot), so it is
exact and unmerging swaps back. Only one adapter can be active or merged at a time.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ...core.layer import AdapterLayer

logger = logging.getLogger(__name__)


class LNTuningLayer(AdapterLayer):
    adapter_param_names = ("ln_tuning_layers",)
    additive = False

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        super().__init__(base_layer)
        self.ln_tuning_layers = nn.ModuleDict()
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        self.ln_tuning_layers[adapter_name] = copy.deepcopy(self.base_layer)

    # ------------------------------------------------------------------ forward
    def adapted_forward(self, x, names: list[str], *args, **kwargs):
        if len(names) > 1:
            raise ValueError(
                f"LN tuning runs one adapter at a time, but {len(names)} are active ({names}); call "
                "set_adapter(<one name>) first."
            )
        own = [name for name in names if name in self.ln_tuning_layers]
        if not own:
            return self.base_forward(x, *args, **kwargs)
        return self.ln_tuning_layers[own[0]](x, *args, **kwargs)

    # ------------------------------------------------------------------ merging = swapping modules
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = self._active_adapters if adapter_names is None else adapter_names
        names = [name for name in names if name in self.ln_tuning_layers]
        if not names:
            return
        if len(names) > 1:
            raise ValueError(
                f"LN tuning merges one adapter at a time, but {len(names)} were asked ({names}); pass "
                "adapter_names=[<one name>]."
            )
        if self.merged_adapters == names:
            logger.info("Adapter '%s' is already merged; skipping.", names[0])
            return
        if self.merged_adapters:
            logger.warning("Adapter(s) %s already merged: unmerging them first.", self.merged_adapters)
            self.unmerge()
        self.merge_one(names[0], safe_merge)
        self.merged_adapters.append(names[0])

    def merge_one(self, name: str, safe_merge: bool) -> None:
        if safe_merge:
            for key, param in self.ln_tuning_layers[name].named_parameters():
                if not torch.isfinite(param).all():
                    raise ValueError(f"NaNs or infs in '{key}' of adapter '{name}': it seems to be broken.")
        self._swap(name)

    def unmerge_one(self, name: str) -> None:
        self._swap(name)

    def _swap(self, name: str) -> None:
        trained = self.ln_tuning_layers[name]
        self.ln_tuning_layers[name] = self.base_layer
        self.base_layer = trained
