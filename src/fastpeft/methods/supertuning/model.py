"""`SupertuningModel`: the Super-Tuning tuner (nn.Linear targets, LoRA's default-target table as HF PEFT)."""

from __future__ import annotations

from torch import nn

from ...core.dispatch import DispatchChain
from ...core.tuner import Tuner
from ...integrations.transformers_defaults import LORA_TARGETS
from .._shared.common import fill_targets, is_nn_linear
from .layer import SupertuningLinear, trained_count

DISPATCH = DispatchChain("Super-Tuning")
DISPATCH.register(nn.Linear, SupertuningLinear)

# as HF PEFT 0.21: a copy of LoRA's table
SUPERTUNING_TARGETS: dict[str, list[str] | str] = {k: v if isinstance(v, str) else list(v)
                                                   for k, v in LORA_TARGETS.items()}


class SupertuningModel(Tuner):
    """As HF PEFT: LoRA's default targets per model type, 'all-linear' over nn.Linear layers; the adapters of
    a model all store their indices in the files or none does."""

    dispatch = DISPATCH

    def prepare_config(self, config, model):
        return fill_targets(config, model, SUPERTUNING_TARGETS, "Super-Tuning", is_nn_linear)

    def layer_kwargs(self, config, key, module):
        return {"target_name": key}

    def check_new_adapter(self, config) -> None:
        values = {c.save_precomputed_indices for c in self.peft_config.values()} | {
            config.save_precomputed_indices}
        if len(values) > 1:
            raise ValueError("Super-Tuning indices must be saved for all adapters of a model or for none, "
                             f"got save_precomputed_indices values {sorted(values)}.")

    def select_targets(self, model, config):
        """The targets, each checked to keep at least one trained entry before anything is built."""
        targets = super().select_targets(model, config)
        for key, module in targets:
            base = module.get_base_layer() if isinstance(module, SupertuningLinear) else module
            if isinstance(base, nn.Linear) and trained_count(base.weight.numel(), config.sparsity) < 1:
                raise ValueError(
                    f"SupertuningConfig.sparsity={config.sparsity} leaves no trained entry in layer '{key}' "
                    f"({base.weight.numel()} weight entries); lower the sparsity or leave the layer out.")
        return targets
