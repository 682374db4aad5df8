"""Tuner bases several methods build on. A subclass gives its `dispatch` chain, whose method name labels the
messages; the registry gives it its parameter prefix."""

from __future__ import annotations

import logging

from torch import nn

from ...core.tuner import Tuner
from ...integrations.transformers_defaults import LORA_TARGETS
from .common import bias_file_keys, fill_targets, is_nn_linear, refuse_second_bias_adapter, train_base_biases

logger = logging.getLogger(__name__)


class LinearFamilyTuner(Tuner):
    """LoRA's default targets per model type (HF PEFT reuses that table for these methods) and 'all-linear'
    over nn.Linear layers, layers told their module name, and `bias`: 'all' trains every base bias,
    '<method>_only' those of the adapted layers (one such adapter per model, as HF PEFT)."""

    def prepare_config(self, config, model):
        return fill_targets(config, model, LORA_TARGETS, self.dispatch.method, is_nn_linear)

    def layer_kwargs(self, config, key, module):
        return {"target_name": key}

    def check_new_adapter(self, config) -> None:
        refuse_second_bias_adapter(self.peft_config, config, self.dispatch.method)

    base_file_keys = staticmethod(bias_file_keys)  # the biases `bias` trains are saved with the adapter

    def mark_extra_trainable(self, adapter_name: str, config) -> None:
        train_base_biases(self, adapter_name, config.bias)


class OrthogonalTuner(Tuner):
    """Rotation methods: LoRA's default targets (HF PEFT reuses that table for them), nn.Linear weights only
    (no Conv1D, so fan_in_fan_out is turned off) and the `bias` option."""

    def prepare_config(self, config, model):
        method = self.dispatch.method
        fill_targets(config, model, LORA_TARGETS, method)
        if config.fan_in_fan_out:
            logger.warning("%s supports nn.Linear (not Conv1D) layers: setting fan_in_fan_out=False.", method)
            config.fan_in_fan_out = False
        return config

    base_file_keys = staticmethod(bias_file_keys)  # the biases `bias` trains are saved with the adapter

    def mark_extra_trainable(self, adapter_name, config):
        train_base_biases(self, adapter_name, config.bias)


class StoresBuiltOnInjection(Tuner):
    """Tuners owning per-adapter tensors built from an adapter's targets while it is injected: once the
    targets are selected, `_add_projections(adapter, config, targets)` builds them (`_adding` and `_autocast`
    hold the adapter being injected and its autocast_adapter_dtype meanwhile); a failed injection of an
    adapter that had none (`_has_projections`) leaves none behind (`_drop_projections`)."""

    def _has_projections(self, adapter_name: str) -> bool:
        raise NotImplementedError

    def _add_projections(self, adapter_name: str, config, targets: list[tuple[str, nn.Module]]) -> None:
        raise NotImplementedError

    def _drop_projections(self, adapter_name: str) -> None:
        raise NotImplementedError

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       **options) -> None:
        self._adding, self._autocast = adapter_name, autocast_adapter_dtype
        existed = self._has_projections(adapter_name)
        try:
            super().inject_adapter(model, adapter_name,
                                   autocast_adapter_dtype=autocast_adapter_dtype, **options)
        except Exception:
            if not existed:  # a failed injection leaves no projections behind
                self._drop_projections(adapter_name)
            raise
        finally:
            self._adding = None

    def select_targets(self, model: nn.Module, config) -> list[tuple[str, nn.Module]]:
        targets = super().select_targets(model, config)
        if self.__dict__.get("_adding") is not None:  # injecting: the new adapter's tensors, built on targets
            self._add_projections(self._adding, config, targets)
        return targets
