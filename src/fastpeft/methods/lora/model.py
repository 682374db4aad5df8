"""`LoraModel`: the LoRA tuner (dispatch table, per-target rank/alpha, config defaults, bias training)."""

from __future__ import annotations

import logging

from torch import nn

from ...core import targeting
from ...core.dispatch import DispatchChain
from ...core.transaction import enclosing
from ...core.tuner import Tuner
from ...integrations.transformers_defaults import LORA_TARGETS, default_targets
from ...quant.merge import AllOrNothingMerge
from .._shared.common import bias_file_keys
from .._shared.modules import is_conv1d, is_linear
from . import bnb as lora_bnb  # LoRA on bitsandbytes layers (QLoRA)
from . import layer, merge, params, replication, tied, token_rows  # params: target_parameters
from .conversion import original_base
from .conversion.moe import convert_config, convert_state  # v4 MoE adapters on transformers v5
from .variants import alora, kasa
from .variants import table as variants_table
from .variants.monteclora import monteclora_loss

logger = logging.getLogger(__name__)


DISPATCH = DispatchChain("LoRA")
DISPATCH.register(nn.Embedding, layer.Embedding)
DISPATCH.register((nn.Conv1d, nn.Conv2d, nn.Conv3d), layer.Conv)
DISPATCH.register(nn.MultiheadAttention, layer.MultiheadAttention)
DISPATCH.register(is_linear, layer.Linear)
DISPATCH.register(params.ParamTarget, params.build_wrappers, first=True)  # target_parameters (params.py)
DISPATCH.register(lora_bnb.is_bnb_linear, lora_bnb.build, first=True)  # bitsandbytes 4-bit / 8-bit (bnb.py)


class LoraModel(AllOrNothingMerge, Tuner):  # merges into bitsandbytes weights: quant/merge.py
    dispatch = DISPATCH
    layer_family = layer.LoraLayer

    def prepare_config(self, config, model):
        unsupported = config.unsupported_options()
        if unsupported:
            raise NotImplementedError(
                f"LoraConfig options {unsupported} are not implemented in fastpeft yet; reset them to their "
                "defaults (or use HF PEFT for these options)."
            )
        convert_config(config, model, lambda m: targeting.all_linear_targets(m, config.task_type, is_linear))
        if config.target_modules is None and params.needs_default_modules(model, config, LORA_TARGETS):
            config.target_modules = default_targets(LORA_TARGETS, model, "LoRA")
        elif isinstance(config.target_modules, str) and config.target_modules.lower() == targeting.ALL_LINEAR:
            config.target_modules = targeting.all_linear_targets(model, config.task_type, is_linear)
        token_rows.check_lora_config(model, config)  # trainable_token_indices / ensure_weight_tying
        self._pending_tie = tied.plan(model, config)  # ensure_weight_tying of embedding layers (tied.py)
        return config

    def prepare_model(self, model, config):
        """layer_replication: stack shared-weight copies of blocks before the targets are looked up."""
        if config.layer_replication:
            undo = replication.replicate_layers(model, config.layer_replication)
            tx = enclosing(model)  # injection runs in a transaction: a later failure restores the stack
            if tx is not None:
                tx.on_failure(undo)

    # ---- trainable tokens (trainable_token_indices): wrappers from methods/trainable_tokens, after LoRA's
    # layers
    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       **options) -> None:
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, **options)
        token_rows.add_token_wrappers(self, model, adapter_name, self.peft_config[adapter_name])
        tie, self._pending_tie = getattr(self, "_pending_tie", None), None
        if tie is not None:
            tied.apply(self, model, adapter_name, tie)
            self._freeze_base()
            self._apply_adapter_state()
    # ---- end of trainable tokens

    # ---- target_parameters: LoRA on bare nn.Parameters (params.py), added after the module targets
    def select_targets(self, model, config):
        params.check_same_parameters(self.peft_config, config)
        if not config.target_parameters:
            return tied.without_tied(super().select_targets(model, config),
                                     getattr(self, "_pending_tie", None))
        modules = super().select_targets(model, config) if config.target_modules else []
        return modules + params.parameter_targets(model, config, {name for name, _ in modules})
    # ---- end of target_parameters

    call_keywords = (alora.CONTEXT_KEY,)  # read by call_context below

    def call_context(self, args, kwargs, adapter_names, copies=1):
        """aLoRA adapters: where each row's invocation sequence starts (variants/alora.py)."""
        return alora.call_context(self, args, kwargs, adapter_names, copies)

    def converted_file_state(self, adapter_name, tensors, config_dict, initial_dir):
        """PiSSA / OLoRA adapters rewritten to apply to the original base (conversion/original_base.py)."""
        return original_base.converted_file_state(self, adapter_name, tensors, config_dict, initial_dir)

    def convert_loaded_state(self, adapter_name, tensors, root):
        """Adapters of transformers v4 MoE models (per-expert linears) in the v5 layout
        (conversion/moe.py)."""
        return convert_state(root, self.model, tensors)

    def _get_monteclora_loss(self, adapter_names=None):
        """MonteCLoRA's variational regulariser for the given (default: active) adapters; add it to the task
        loss."""
        return monteclora_loss(self, adapter_names)

    def _get_kasa_loss(self, adapter_names=None):
        """KaSA's regularisers for the given (default: active) adapters; add them to the task loss."""
        return kasa.kasa_loss(self, adapter_names)

    def mixed_model_refusals(self, config):
        """Options served by LoRA's own injection steps or per-call values, which a mixed model does not run
        (token rows, weight tying, bare parameters, replicated blocks, the variants' forward rules)."""
        found = [option for option in ("trainable_token_indices", "ensure_weight_tying", "target_parameters",
                                       "layer_replication") if getattr(config, option)]
        active = [row.option for row in variants_table.VARIANTS if row.active(config)]
        return found + [f"{option} (a LoRA variant)" for option in active]

    def check_mergeable(self):
        if any(getattr(c, "layer_replication", None) for c in self.peft_config.values()):
            raise ValueError(
                "Cannot merge adapters into a model built with layer_replication: the replicated layers "
                "share one base weight, so every copy's update would land in it. Keep the adapter "
                "unmerged (or use unload())."
            )

    def check_new_adapter(self, config):
        kasa.check_new_adapter(self.peft_config, config)  # KaSA truncates the base: no other kind of adapter
        others = [n for n, c in self.peft_config.items() if c is not config and c.bias != "none"]
        if others and config.bias != "none":
            raise ValueError(
                f"Adapter '{others[0]}' already trains base biases "
                f"(bias={self.peft_config[others[0]].bias!r}); only one adapter per model may set "
                "bias other than 'none'."
            )

    def layer_kwargs(self, config, key, module):
        kwargs = {
            "r": targeting.pattern_value(config.rank_pattern, key, config.r),
            "lora_alpha": targeting.pattern_value(config.alpha_pattern, key, config.lora_alpha),
            "target_name": key,  # read by variants that depend on the module's name (BD-LoRA)
        }
        if is_linear(module):
            kwargs["fan_in_fan_out"] = self._fan_in_fan_out(config, module, key)
        return kwargs

    @staticmethod
    def _fan_in_fan_out(config, module, key) -> bool:
        conv1d = is_conv1d(module)
        if conv1d and not config.fan_in_fan_out:
            logger.warning("'%s' is a Conv1D (weight stored (in, out)): setting fan_in_fan_out=True.", key)
            config.fan_in_fan_out = True
        elif not conv1d and config.fan_in_fan_out:
            logger.warning("'%s' is an nn.Linear: setting fan_in_fan_out=False.", key)
            config.fan_in_fan_out = False
        return config.fan_in_fan_out

    base_file_keys = staticmethod(bias_file_keys)  # the biases `bias` trains are saved with the adapter

    def mark_extra_trainable(self, adapter_name, config):
        if config.bias == "all":
            for name, param in self.model.named_parameters():
                if name.rsplit(".", 1)[-1] == "bias" and not _is_adapter_param(name):
                    param.requires_grad_(True)
        elif config.bias == "lora_only":
            for lora_layer in self.adapter_layers():
                bias = getattr(lora_layer.get_base_layer(), "bias", None)
                if adapter_name in lora_layer.adapter_names() and bias is not None:
                    bias.requires_grad_(True)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             svd_driver: str | None = None, density: float | None = None,
                             majority_sign_method: str = "total") -> None:
        """Add `adapter_name`, a weighted combination of existing LoRA `adapters` (HF PEFT's signature).

        combination_type: 'linear' / 'ties' / 'dare_linear' / 'dare_ties' / 'magnitude_prune' merge the A and
        B factors (same ranks needed); 'cat' stacks them (rank = sum); 'svd' and the '*_svd' variants merge
        the full deltas and keep a rank-`svd_rank` SVD (default: the largest rank). `density` is the fraction
        kept by pruning types; `majority_sign_method` ('total' / 'frequency') elects TIES signs. The new
        adapter has lora_alpha = r and is not activated: call set_adapter(adapter_name) to use it.
        """
        params.refuse_weighted(self.peft_config, adapters)  # target_parameters
        merge.add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank,
                                   svd_clamp, svd_full_matrices, svd_driver, density, majority_sign_method)


def _is_adapter_param(name: str) -> bool:
    return ".modules_to_save." in name or ".original_module." in name
